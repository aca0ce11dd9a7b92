"""Eval stage: fixed-noise before/after comparison of the base model and tuned models on held-out prompts.

Every model generates from the same prompts and the same prior noises (the generate stage's seed rule, with
`eval.seed` as the run seed), K samples per prompt, so each tuned sample has a base twin. Every reward of the
manifest scores them, including rewards training never saw (`eval.rewards`, e.g. a held-out classifier).

Per model and reward: the mean with a 95% bootstrap CI, and against the base: the paired delta and win rate
(a tie, |a - b| <= 1e-6, counts as half a win and is reported) with 95% CIs. Bootstrap resamples prompts
(a prompt's K samples move together). Drift is the mean absolute pixel difference (in [0, 1]) between a tuned
image and its base twin.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import GenerateSection, Manifest, RewardSpec, ScoreSection
from pipeline.errors import StageError
from pipeline.generate import SampleGenerator, load_model, pick_device
from pipeline.prompts import load_prompts
from pipeline.readers import decode_png
from pipeline.score import decode_images
from pipeline.stage import DONE, Eval, round_dir

log = logging.getLogger("tauflow")
TIE = 1e-6


@dataclass(frozen=True)
class Model:
    name: str
    path: str
    format: str  # "base", "pipeline", or a LoRA format ("lora", "lora_adapter")


def discover_models(manifest: Manifest) -> list[Model]:
    gen = manifest.require("generate")
    models = [Model("base", gen.model, "base")]
    cfg = manifest.require("eval")
    if cfg.models:
        for ref in cfg.models:
            path = Path(ref)
            if (path / DONE).exists():  # a train/<method> output: its result
                info = json.loads((path / DONE).read_text())
                models.append(Model(path.name, info["final"], info["format"]))
                continue
            fmt = "lora" if (path / "pytorch_lora_weights.safetensors").exists() else "pipeline"
            models.append(Model(path.parent.name if path.name in ("lora", "pipeline") else path.name, ref, fmt))
        return models
    for r in range(manifest.run.rounds):  # with several rounds, each round's model, named <method>/round-<r>
        for done in sorted((round_dir(manifest, r) / "train").glob("*/done.json")):
            info = json.loads(done.read_text())
            name = info["method"] if manifest.run.rounds == 1 else f"{info['method']}/round-{r}"
            models.append(Model(name, info["final"], info["format"]))
    if len(models) == 1:
        raise StageError(f"{manifest.source}: nothing to compare: no eval.models and no finished training under "
                         f"{manifest.output_dir / 'train'}")
    return models


def load_for_eval(model: Model, gen: GenerateSection, device: str) -> Any:
    """The base, or a tuned model on the base it was trained from (a LoRA of a later round: on the rounds before)."""
    ref = gen.model if model.format == "base" else model.path
    return load_model(ref, torch_dtype=gen.torch_dtype, local_files_only=gen.local_files_only, device=device,
                      lora_base=gen.model)


def cluster_bootstrap(values: np.ndarray, draws: int, rng: np.random.Generator) -> tuple[float, float]:
    """95% CI of the mean of a (prompts, K) array, resampling prompts."""
    idx = rng.integers(0, len(values), size=(draws, len(values)))
    means = values[idx].mean(axis=(1, 2))
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired(tuned: np.ndarray, base: np.ndarray, draws: int, rng: np.random.Generator) -> dict[str, Any]:
    diff = tuned - base
    wins = np.where(np.abs(diff) <= TIE, 0.5, (diff > 0).astype(np.float64))
    return {
        "delta": float(diff.mean()), "delta_ci": cluster_bootstrap(diff, draws, rng),
        "win_rate": float(wins.mean()), "win_ci": cluster_bootstrap(wins, draws, rng),
        "wins": int((diff > TIE).sum()), "ties": int((np.abs(diff) <= TIE).sum()), "losses": int((diff < -TIE).sum()),
    }


def _pixels(pngs: list[bytes]) -> np.ndarray:
    return np.stack([decode_png(b) for b in pngs]).astype(np.float32) / 255.0


def run_eval(manifest: Manifest, *, overwrite: bool = False) -> Path:
    """The eval stage (pipeline.stage.Eval): skipped when complete with the same models and settings."""
    return Eval(manifest).execute(overwrite=overwrite)


def evaluate(manifest: Manifest, models: list[Model], out: Path) -> dict[str, Any]:
    """Generate and score every model from the same noise; writes the report and returns results.json's content."""
    from rewards.bank import RewardBank, available_cpus

    cfg, gen = manifest.require("eval"), manifest.require("generate")
    out.mkdir(parents=True, exist_ok=True)
    prompts, _ = load_prompts(cfg.prompts, gen.prompt_column, dedupe=False)
    k = cfg.images_per_prompt
    eval_gen = gen.model_copy(update={"images_per_prompt": k})
    train_rewards = list(manifest.score.rewards) if manifest.score else []
    specs: list[RewardSpec] = train_rewards + [r for r in cfg.rewards if r.name not in {s.name for s in train_rewards}]
    if not specs:
        raise StageError(f"{manifest.source}: eval needs rewards (score.rewards or eval.rewards)")
    device = pick_device(gen.device)
    # scored as the score stage scores (its batch size and dtype), decoding on every CPU of this process
    score = manifest.score or ScoreSection(rewards=specs)
    bank = RewardBank(specs, device, dtype=score.dtype, threads=available_cpus())
    results: dict[str, Any] = {
        "prompts": str(cfg.prompts), "n_prompts": len(prompts), "images_per_prompt": k, "seed": cfg.seed,
        "rewards": [s.name for s in specs], "training_rewards": [s.name for s in train_rewards],
        "heldout_rewards": [s.name for s in specs if s not in train_rewards], "models": [],
    }
    images: dict[str, list[bytes]] = {}
    base_scores: dict[str, np.ndarray] = {}
    base_pixels: np.ndarray | None = None
    rng = np.random.default_rng(cfg.seed)
    for model in models:
        log.info("eval: generating and scoring %s", model.name)
        sampler = SampleGenerator(eval_gen, cfg.seed, pipe=load_for_eval(model, eval_gen, device))
        table = sampler.table(prompts)
        pngs = [v["bytes"] for v in table["image"].to_pylist()]
        images[model.name] = pngs
        scores = bank.score_batches(lambda t=table: ((decode_images(t["image"][lo : lo + score.batch_size]),
                                                      t["prompt"][lo : lo + score.batch_size].to_pylist())
                                                     for lo in range(0, t.num_rows, score.batch_size)))
        entry: dict[str, Any] = {"name": model.name, "format": model.format, "path": model.path, "rewards": {}}
        for name, values in scores.items():
            grid = values.reshape(len(prompts), k).astype(np.float64)
            entry["rewards"][name] = {"mean": float(grid.mean()), "ci": cluster_bootstrap(grid, cfg.bootstrap, rng)}
            if model.name == "base":
                base_scores[name] = grid
            else:
                entry["rewards"][name]["vs_base"] = paired(grid, base_scores[name], cfg.bootstrap, rng)
        if model.name == "base":
            base_pixels = _pixels(pngs)
        else:
            entry["drift"] = float(np.abs(_pixels(pngs) - base_pixels).mean())
        results["models"].append(entry)
        results.setdefault("scores", {})[model.name] = {n: v.tolist() for n, v in scores.items()}
    from pipeline.report import write_report

    write_report(manifest, results, images, out)
    return results
