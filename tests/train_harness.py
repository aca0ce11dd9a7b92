"""Shared set-up of the trainer tests: a tiny run with labels and pairs, and one training step outside the loop."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from pipeline.config import load_manifest
from pipeline.generate import run_generate
from pipeline.pair import run_pair
from pipeline.score import run_score
from pipeline.threshold import run_threshold
from tests.conftest import write_manifest
from trainer.data import GlobalBatches
from trainer.methods import METHODS
from trainer.recipe import DATA_STAGES, Step, load_generator, training_data

PROMPTS = "a red cat\na blue dog\nthe photo of a digit\na handwritten seven\nan orange fox\n"


def prepare_run(root: Path, model: Path):
    """Generate, score, threshold and pair a tiny run of `model`; returns make(name, **train) -> Manifest."""
    (root / "prompts.txt").write_text(PROMPTS)
    base = {
        "run": {"name": "t", "output_dir": str(root / "out"), "executor": "local"},
        "generate": {"model": str(model), "prompts": str(root / "prompts.txt"), "images_per_prompt": 4,
                     "num_inference_steps": 2, "height": 16, "width": 16, "batch_size": 8, "guidance_scale": 2.0},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}]},
        "threshold": {"reward": "bright"},
        "pair": {"reward": "bright"},
    }
    m = load_manifest(write_manifest(root / "base.yaml", base))
    for stage in (run_generate, run_score, run_threshold, run_pair):
        stage(m)

    def make(name: str = "m.yaml", **train: Any):
        data = {**base, "train": {"batch_size": 4, "learning_rate": 1e-3, "max_steps": 2, **train}}
        if "output_dir" in train:  # a separate training output, reading this run's data
            data["run"] = {**base["run"], "output_dir": train.pop("output_dir")}
            data["train"].pop("output_dir")
            data["train"].setdefault("data", str(m.stage_dir(DATA_STAGES[METHODS[train["method"]].data])))
        return load_manifest(write_manifest(root / name, data))

    return make


class OneProcess:
    """The accelerator surface Step uses, for one process (training itself runs through accelerate)."""

    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def unwrap_model(self, m):
        return m

    def reduce(self, t, reduction="mean"):
        return t


def make_step(manifest) -> tuple[Step, dict[str, Any]]:
    """A Step with a trainable policy and (where the method needs one) a frozen copy as reference, and the first
    batch of its data, set up as the recipe sets them up."""
    cfg, method = manifest.train, METHODS[manifest.train.method]
    path, dataset = training_data(manifest, method)
    _, adapter = load_generator(manifest, torch.device("cpu"))
    policy = adapter.denoiser.requires_grad_(True).train()
    reference = copy.deepcopy(policy).requires_grad_(False).eval() if method.needs_reference else None
    batch = next(GlobalBatches(path, method.columns(set(dataset.features)), cfg.batch_size, kind=method.data).epoch(0))
    return Step(cfg, adapter, policy, reference, OneProcess(), dataset.stats), batch


def one_sgd_step(step: Step, batch: dict[str, Any]) -> dict[str, float]:
    """Metrics on `batch` (same noise and t) after one small, first-order SGD step on it."""
    opt = torch.optim.SGD([p for p in step.policy.parameters() if p.requires_grad], lr=1e-6)
    loss, _ = step(batch, 0, 0.0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        return step(batch, 0, 0.0)[1]
