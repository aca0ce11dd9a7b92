"""`python -m benchmarks.study [--seeds N] [--quick]`: a fair method study in the digits world (issue #18).

Fairness, in order of the run:
1. The world's 200 training prompts are split: every 5th is a *tuning* prompt, held out of training. The 50
   evaluation prompts and the held-out classifier are not touched until the final evaluation.
2. Every method gets the same tuning grid (learning rates x its beta or temperature), trained at seed 0 and judged
   by the training reward's mean delta vs base on the tuning prompts only.
3. Each method's chosen configuration is trained at every seed and evaluated on the evaluation prompts. The delta
   vs base gets a 95% CI from a two-level bootstrap: resample the seeds, then the prompts (the same prompt draw
   for every seed of a replicate, since prompts and seeds are crossed).
4. Ablations reuse the chosen configurations (threshold c, percentile, tau mode; PNAPO recorded vs fresh noise,
   dynamic beta factors; KTO's weights) and held-out reward vs step comes from checkpoints of seed 0.

Generation, scoring, thresholding and pairing run once and are shared; only train + eval differ per run. Every run
is a stage with its own output_dir, so a rerun skips what is finished. Writes runs/study/report.md and report.html.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeline.config import Manifest, parse_manifest  # noqa: E402
from pipeline.stage import stage_named  # noqa: E402
from trainer.methods import METHODS as REGISTRY  # noqa: E402

METHODS = ("tgo", "dpo", "pnapo", "kto", "sft")
REWARDS = ("fidelity", "heldout")
# each method's beta (TGO: with T = 0.001) for the grid, the demo's value first; SFT has none
BETAS = {"tgo": [0.2, 1.0], "dpo": [2000.0, 500.0], "pnapo": [2000.0, 500.0], "kto": [2000.0, 200.0], "sft": [None]}


@dataclass(frozen=True)
class Scale:
    """How big the study is: the budget of each training run, the tuning grid, the seeds and the eval sets."""

    seeds: int = 5
    ablation_seeds: int = 5
    steps: int = 200
    batch_size: int = 16
    learning_rates: tuple[float, ...] = (1e-5, 3e-5, 1e-4)
    betas: int = 2  # how many of each method's betas (BETAS) the grid tries
    curve_points: int = 4  # checkpoints of seed 0 evaluated for reward vs step
    images_per_prompt: int = 8  # generate
    eval_images: int = 4
    eval_prompts: int | None = None  # None: all 50
    tune_images: int = 4
    bootstrap: int = 2000
    min_gap: float = 0.2  # pair.min_gap, as the demo

    def grid(self, method: str) -> list[tuple[float, float | None]]:
        return [(lr, b) for lr in self.learning_rates for b in BETAS[method][: self.betas]]


QUICK = Scale(seeds=2, ablation_seeds=1, steps=8, batch_size=4, learning_rates=(1e-4,), betas=1, curve_points=2,
              images_per_prompt=4, eval_images=2, eval_prompts=6, tune_images=2, bootstrap=200)


@dataclass
class Study:
    world: Path
    out: Path
    scale: Scale

    # -- manifests -------------------------------------------------------------------------------------------
    def prompts(self) -> tuple[Path, Path, Path]:
        """train.txt (4 of every 5 training prompts), tune.txt (every 5th) and eval.txt (maybe a prefix)."""
        d = self.out / "prompts"
        d.mkdir(parents=True, exist_ok=True)
        lines = (self.world / "prompts" / "train.txt").read_text().splitlines()
        evals = (self.world / "prompts" / "eval.txt").read_text().splitlines()[: self.scale.eval_prompts]
        files = {"train.txt": [p for i, p in enumerate(lines) if i % 5 != 4], "tune.txt": lines[4::5], "eval.txt": evals}
        for name, rows in files.items():
            if not (d / name).exists() or (d / name).read_text() != "\n".join(rows) + "\n":
                (d / name).write_text("\n".join(rows) + "\n")
        return d / "train.txt", d / "tune.txt", d / "eval.txt"

    def base(self, output_dir: Path, **sections: Any) -> Manifest:
        """The demo's settings (manifests/demo.yaml) with the study's prompts, run in-process."""
        train_prompts, _, _ = self.prompts()
        data: dict[str, Any] = {
            "run": {"name": output_dir.name, "output_dir": str(output_dir), "seed": 0, "executor": "local"},
            "generate": {"model": str(self.world / "base"), "prompts": str(train_prompts), "dedupe_prompts": False,
                         "images_per_prompt": self.scale.images_per_prompt, "num_inference_steps": 8,
                         "guidance_scale": 3.0, "height": 16, "width": 16, "batch_size": 80, "prompts_per_shard": 40,
                         "pipeline_kwargs": {"max_sequence_length": 10}},
            "score": {"rewards": [self.reward("fidelity")], "batch_size": 200},
            "threshold": {"reward": "fidelity", "percentile": 50, "mode": "global", "c": 5.0},
            "pair": {"reward": "fidelity", "strategy": "all", "min_gap": self.scale.min_gap},
        }
        for name, value in sections.items():
            data[name] = {**data.get(name, {}), **value} if isinstance(value, dict) else value
        return parse_manifest({k: v for k, v in data.items() if v is not None}, str(output_dir / "study"))

    def reward(self, name: str) -> dict[str, str]:
        return {"name": name, "kind": "world.rewards:DigitReward", "checkpoint": str(self.world / "rewards" / name)}

    # -- stages ----------------------------------------------------------------------------------------------
    def data(self, threshold: dict[str, Any] | None = None) -> Path:
        """The shared samples, scores and pairs; a threshold variant gets its own labels from the shared scores."""
        shared = self.out / "data"
        for stage in ("generate", "score", "threshold", "pair"):
            stage_named(stage)(self.base(shared)).execute()
        if not threshold:
            return shared
        variant = self.out / ("data-" + "-".join(f"{k}{v}" for k, v in sorted(threshold.items())))
        variant.mkdir(parents=True, exist_ok=True)
        for folder in ("samples", "scored"):  # the threshold stage reads <output_dir>/scored
            link = variant / folder
            if not link.exists():
                link.symlink_to((shared / folder).resolve(), target_is_directory=True)
        stage_named("threshold")(self.base(variant, threshold=threshold)).execute()
        return variant

    def train(self, name: str, method: str, data: Path, **train: Any) -> Path:
        """One training run (its own output_dir); returns the trained pipeline's directory."""
        s = self.scale
        cfg = {"method": method, "data": str(data / REGISTRY[method].data), "max_steps": s.steps, "batch_size": s.batch_size,
               "checkpoint_every": max(1, s.steps // s.curve_points), "checkpoint_limit": s.curve_points + 1, **train}
        manifest = self.base(self.out / "runs" / name, train=cfg)
        stage_named("train")(manifest).execute()
        return manifest.output_dir / "train" / method / "pipeline"

    def evaluate(self, name: str, models: list[Path], split: str) -> dict[str, Any]:
        """Base vs `models` on the tuning prompts (training reward only) or the evaluation prompts (both)."""
        _, tune, evals = self.prompts()
        held = [self.reward("heldout")] if split == "eval" else []
        k = self.scale.eval_images if split == "eval" else self.scale.tune_images
        manifest = self.base(self.out / split / name, eval={"prompts": str(evals if split == "eval" else tune),
                             "images_per_prompt": k, "models": [str(m) for m in models], "rewards": held,
                             "grid_prompts": 6, "bootstrap": 1000})
        stage_named("eval")(manifest).execute()
        results = json.loads((manifest.output_dir / "eval" / "results.json").read_text())
        deltas = ", ".join(f"{r} {v['vs_base']['delta']:+.3f}" for r, v in results["models"][1]["rewards"].items())
        print(f"study: {split}/{name}: {deltas}, drift {results['models'][1]['drift']:.4f}", flush=True)
        return results

    def run(self, name: str, method: str, data: Path, split: str = "eval", **train: Any) -> dict[str, Any]:
        return self.evaluate(name, [self.train(name, method, data, **train)], split)


# -- statistics --------------------------------------------------------------------------------------------
def diffs(results: dict[str, Any], reward: str) -> np.ndarray:
    """(prompts, K) tuned - base for the one tuned model of an eval."""
    k = results["images_per_prompt"]
    base = np.asarray(results["scores"]["base"][reward]).reshape(-1, k)
    tuned = np.asarray(results["scores"][results["models"][1]["name"]][reward]).reshape(-1, k)
    return tuned - base


def two_level(per_seed: list[np.ndarray], draws: int, seed: int = 0) -> dict[str, float]:
    """Mean delta over seeds and prompts, with a 95% CI resampling seeds, then prompts (one prompt draw per
    replicate, shared by its seeds: every seed is evaluated on the same prompts)."""
    stack = np.stack([d.mean(axis=1) for d in per_seed])  # (seeds, prompts)
    rng = np.random.default_rng(seed)
    s = rng.integers(0, stack.shape[0], size=(draws, stack.shape[0]))
    p = rng.integers(0, stack.shape[1], size=(draws, stack.shape[1]))
    means = np.array([stack[s[i]][:, p[i]].mean() for i in range(draws)])
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"delta": float(stack.mean()), "lo": float(lo), "hi": float(hi), "seeds": [float(x) for x in stack.mean(axis=1)]}


def summary(evals: list[dict[str, Any]], draws: int) -> dict[str, Any]:
    """Per reward: the two-level delta; and the mean drift over seeds."""
    rewards = evals[0]["rewards"]
    out = {r: two_level([diffs(e, r) for e in evals], draws) for r in rewards}
    out["drift"] = float(np.mean([e["models"][1]["drift"] for e in evals]))
    out["n_seeds"] = len(evals)
    return out


def log_mean(run_dir: Path, key: str) -> float:
    logs = list(run_dir.glob("train/*/log.jsonl"))
    values = [json.loads(line).get(key) for line in logs[0].read_text().splitlines()] if logs else []
    values = [v for v in values if isinstance(v, (int, float))]
    return float(np.mean(values)) if values else float("nan")


def contrast(a: list[dict[str, Any]], b: list[dict[str, Any]], reward: str, draws: int) -> dict[str, float]:
    """A - B: the per-seed paired differences of two runs' deltas (same seeds, prompts and noise)."""
    return two_level([diffs(x, reward) - diffs(y, reward) for x, y in zip(a, b)], draws)


def _all(verdicts: list[str]) -> str:
    """'A > B > C': reproduced if every link is; not reproduced if any link is reversed."""
    return "not reproduced" if "not reproduced" in verdicts else "reproduced" if set(verdicts) == {"reproduced"} else "inconclusive"


def first_reaching(points: list[dict[str, float]], level: float) -> int | None:
    return next((p["step"] for p in points if p["step"] > 0 and p["heldout"] >= level), None)


def claims(main: dict[str, list], runs: dict[str, list], curves: dict[str, list], draws: int) -> list[dict[str, str]]:
    """Each claim of the TGO and PNAPO papers as a contrast of this study's runs, with its verdict."""
    from benchmarks.study_report import fmt, verdict

    n = len(runs["tgo c=0"])
    out = []

    def add(claim: str, verdicts: list[str], numbers: str) -> None:
        out.append({"claim": claim, "verdict": _all(verdicts), "numbers": numbers})

    links = [(a, b, r, contrast(main[a], main[b], r, draws)) for a, b in (("tgo", "kto"), ("kto", "dpo")) for r in REWARDS]
    dpo = {r: summary(main["dpo"], draws)[r] for r in REWARDS}
    add("TGO > Diffusion-KTO > Diffusion-DPO > base, on every reward",
        [verdict(c) for *_, c in links] + [verdict(dpo[r]) for r in REWARDS],
        "; ".join(f"{a}-{b} {r} {fmt(c)}" for a, b, r, c in links) + "; " + "; ".join(f"dpo-base {r} {fmt(dpo[r])}" for r in REWARDS))
    c = {r: contrast(main["tgo"], main["sft"], r, draws) for r in REWARDS}
    tgo_drift = curves["tgo"][-1]["drift"]
    sft_match = min(curves["sft"][1:], key=lambda p: abs(p["drift"] - tgo_drift)) if len(curves["sft"]) > 1 else None
    matched = (f"; at matched drift (seed 0): TGO {curves['tgo'][-1]['heldout']:+.3f} at drift {tgo_drift:.3f} vs SFT "
               f"step {sft_match['step']} {sft_match['heldout']:+.3f} at drift {sft_match['drift']:.3f}") if sft_match else ""
    add("SFT on the pseudo-positives < TGO", [verdict(c[r]) for r in REWARDS],
        "; ".join(f"tgo-sft {r} {fmt(c[r])}" for r in REWARDS) + matched)
    c = contrast(runs["tgo (c=5, p50, global)"], runs["tgo c=0"], "heldout", draws)
    add("TGO confidence weighting c = 5 beats c = 0", [verdict(c)], f"c5-c0 {fmt(c)} ({n} seeds)")
    cs = {p: contrast(runs["tgo (c=5, p50, global)"], runs[f"tgo percentile {p}"], "heldout", draws) for p in (30, 70)}
    add("extreme percentiles for tau (30, 70) are worse than the median", [verdict(v) for v in cs.values()],
        "; ".join(f"p50-p{p} {fmt(v)}" for p, v in cs.items()))
    held = {m: summary(e, draws)["heldout"] for m, e in main.items()}
    add("training on one reward (fidelity) raises the others (held-out classifier), TGO", [verdict(held["tgo"])],
        "; ".join(f"{m} {fmt(s)}" for m, s in held.items()))
    c = contrast(runs["pnapo recorded noise"], runs["pnapo fresh noise"], "heldout", draws)
    add("PNAPO falsification test: recorded prior noise beats the same loss with fresh independent noise "
        "(same steps and batch, so equal compute)", [verdict(c)], f"recorded-fresh {fmt(c)} ({n} seeds)")
    c = contrast(main["pnapo"], main["dpo"], "heldout", draws)
    add("PNAPO (recorded-noise surrogate) beats fresh-noise Diffusion-DPO", [verdict(c)], f"pnapo-dpo {fmt(c)}")
    target = curves["dpo"][-1]["heldout"]
    reached = first_reaching(curves["pnapo"], target)
    final = curves["dpo"][-1]["step"]
    steps_verdict = "inconclusive" if target <= 0 else "reproduced" if reached is not None and reached < final else "not reproduced"
    out.append({"claim": "PNAPO needs less compute: fewer steps to DPO's final held-out gain", "verdict": steps_verdict + " (one seed)",
                "numbers": f"DPO final {target:+.3f} at step {final}; PNAPO reaches it at step {reached if reached else 'never'} "
                           "(curve " + ", ".join(f"{p['step']}: {p['heldout']:+.3f}" for p in curves["pnapo"]) + ")"})
    c = contrast(runs["pnapo recorded noise"], runs["pnapo static beta"], "heldout", draws)
    spread = {k: float(np.std(summary(runs[k], draws)["heldout"]["seeds"])) for k in ("pnapo recorded noise", "pnapo static beta")}
    parts = [f"dynamic-static {fmt(c)}"] + [f"dynamic-({k} off) {fmt(contrast(runs['pnapo recorded noise'], runs[f'pnapo {k} off'], 'heldout', draws))}"
                                             for k in ("gap", "schedule")]
    add("PNAPO's dynamic beta (gap, schedule) adds stability and sample efficiency", [verdict(c)],
        "; ".join(parts) + f"; seed spread (std) dynamic {spread['pnapo recorded noise']:.3f} vs static {spread['pnapo static beta']:.3f}")
    return out


def tag(cfg: dict[str, Any]) -> str:
    """A run's name part for a configuration: the tuning run of the chosen configuration is the main run of seed 0."""
    return "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}" for k, v in sorted(cfg.items())
                    if not isinstance(v, dict)) or "default"


# -- checkpoints as pipelines -------------------------------------------------------------------------------
def checkpoint_pipelines(study: Study, name: str) -> list[tuple[int, Path]]:
    """Each kept checkpoint of run `name` saved as a diffusers pipeline (base weights + the checkpoint's
    transformer), so that eval can load it; cached next to the checkpoint."""
    from safetensors.torch import load_file

    from pipeline.generate import load_model

    run = study.out / "runs" / name
    found = []
    for ckpt in sorted(run.glob("train/*/checkpoints/checkpoint-*"), key=lambda p: int(p.name.split("-")[1])):
        step = int(ckpt.name.split("-")[1])
        target = run / "curve" / f"step-{step}" / "pipeline"
        if step < study.scale.steps and not (target / "model_index.json").exists():
            pipe = load_model(str(study.world / "base"), device="cpu")
            pipe.transformer.load_state_dict(load_file(str(ckpt / "model.safetensors")))
            pipe.save_pretrained(str(target))
        found.append((step, target))
    return found


# -- the study -----------------------------------------------------------------------------------------------
def run_study(world: Path, out: Path, scale: Scale) -> dict[str, Any]:
    study = Study(world, out, scale)
    t0 = time.perf_counter()
    shared = study.data()
    res: dict[str, Any] = {"scale": scale.__dict__ | {"learning_rates": list(scale.learning_rates)},
                           "tune_prompts": len(study.prompts()[1].read_text().splitlines())}
    seeds = list(range(scale.seeds))
    ab_seeds = list(range(scale.ablation_seeds))

    # 1. tuning: seed 0, judged on the tuning prompts by the training reward
    tuning: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, dict[str, Any]] = {}
    for method in METHODS:
        rows = []
        for lr, beta in scale.grid(method):
            cfg = {"learning_rate": lr, **({"beta": beta} if beta is not None else {})}
            name = f"{method}-{tag(cfg)}-s0"
            study.train(name, method, shared, seed=0, **cfg)
            r = study.evaluate(name, [out / "runs" / name / "train" / method / "pipeline"], "tune")
            vs = r["models"][1]["rewards"]["fidelity"]["vs_base"]
            rows.append({"name": name, "config": cfg, "tune_delta": vs["delta"], "tune_ci": vs["delta_ci"],
                         "drift": r["models"][1]["drift"]})
        tuning[method] = rows
        best = max(rows, key=lambda row: row["tune_delta"])
        chosen[method] = best["config"]
    res["tuning"], res["chosen"] = tuning, chosen
    print(f"study: tuning done at {time.perf_counter() - t0:.0f}s; chosen {chosen}", flush=True)

    def seeds_of(method: str, data: Path, which: list[int], **extra: Any) -> list[dict[str, Any]]:
        cfg = {**chosen[method], **extra}
        extra_tag = "" if not extra else "-" + "-".join(f"{k}{json.dumps(v, sort_keys=True) if isinstance(v, dict) else v}"
                                                        .replace('"', "").replace(" ", "") for k, v in sorted(extra.items()))
        data_tag = "" if data == shared else "-" + data.name
        return [study.run(f"{method}-{tag(chosen[method])}{extra_tag}{data_tag}-s{s}", method, data, seed=s, **cfg)
                for s in which]

    # 2. the chosen configurations over seeds, on the evaluation prompts
    main = {m: seeds_of(m, shared, seeds) for m in METHODS}
    res["main"] = {m: summary(e, scale.bootstrap) for m, e in main.items()}
    base_eval = main["tgo"][0]["models"][0]["rewards"]
    res["base"] = {r: v["mean"] for r, v in base_eval.items()}
    print(f"study: main done at {time.perf_counter() - t0:.0f}s", flush=True)

    # 3. ablations with the chosen configurations
    n = len(ab_seeds)
    runs = {
        "tgo (c=5, p50, global)": main["tgo"][:n],
        "tgo c=0": seeds_of("tgo", study.data({"c": 0.0}), ab_seeds),
        **{f"tgo percentile {p}": seeds_of("tgo", study.data({"percentile": float(p)}), ab_seeds) for p in (30, 70)},
        **{f"tgo tau {mode}": seeds_of("tgo", study.data({"mode": mode}), ab_seeds) for mode in ("per_prompt", "shrunk")},
        "pnapo recorded noise": main["pnapo"][:n],
        "pnapo fresh noise": seeds_of("pnapo", shared, ab_seeds, noise="fresh"),
        **{f"pnapo {label}": seeds_of("pnapo", shared, ab_seeds, dynamic_beta=dyn)
           for label, dyn in (("gap off", {"gap": False}), ("schedule off", {"schedule": False}),
                              ("static beta", {"gap": False, "schedule": False}))},
        "kto (chosen)": main["kto"][:n],
        "kto undesirable weight 0.5": seeds_of("kto", shared, ab_seeds, kto_undesirable_weight=0.5),
    }
    res["ablations"] = {name: summary(e, scale.bootstrap) for name, e in runs.items()}
    print(f"study: ablations done at {time.perf_counter() - t0:.0f}s", flush=True)

    # 4. held-out reward vs step (seed 0 checkpoints) and KTO's diagnostics from its logs
    curves: dict[str, list[dict[str, float]]] = {}
    for method in METHODS:
        name = f"{method}-{tag(chosen[method])}-s0"
        points = [{"step": 0, "heldout": 0.0, "fidelity": 0.0, "drift": 0.0}]
        for step, pipe in checkpoint_pipelines(study, name):  # the last one is the final model, evaluated above
            r = main[method][0] if step == scale.steps else study.evaluate(f"{name}-step{step}", [pipe], "eval")
            points.append({"step": step, "heldout": float(diffs(r, "heldout").mean()),
                           "fidelity": float(diffs(r, "fidelity").mean()), "drift": r["models"][1]["drift"]})
        curves[method] = points
    res["curves"] = curves
    res["kto_logs"] = {row["name"]: {k: log_mean(out / "runs" / row["name"], k) for k in ("kto_z", "implicit_acc", "policy_error")}
                       for row in tuning["kto"]}
    res["claims"] = claims(main, runs, curves, scale.bootstrap)
    res["seconds"] = time.perf_counter() - t0
    from benchmarks.study_report import write_study_report

    write_study_report(res, out)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.study", description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=Path("runs/world"))
    ap.add_argument("--out", type=Path, default=Path("runs/study"))
    ap.add_argument("--seeds", type=int, default=None, help="training seeds of the chosen configurations (default 5)")
    ap.add_argument("--ablation-seeds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="training steps of every run (default 200, as the demo)")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="the tuning grid's learning rates")
    ap.add_argument("--betas", type=int, default=None, help="how many betas per method the grid tries (1 or 2)")
    ap.add_argument("--quick", action="store_true", help="a tiny scale for tests (minutes)")
    args = ap.parse_args()
    scale = QUICK if args.quick else Scale()
    overrides = {"seeds": args.seeds, "ablation_seeds": args.ablation_seeds, "steps": args.steps, "betas": args.betas,
                 "learning_rates": tuple(args.lrs) if args.lrs else None}
    scale = Scale(**{**scale.__dict__, **{k: v for k, v in overrides.items() if v is not None}})
    from world.build import build_world

    build_world(args.world)
    t0 = time.perf_counter()
    run_study(args.world, args.out, scale)
    print(f"study: {args.out / 'report.md'} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
