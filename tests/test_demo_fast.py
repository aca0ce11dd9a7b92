"""A fast variant of manifests/demo.yaml: a smaller digits world, fewer prompts and steps, the same stages.
It asserts the direction of the effect: TGO and PNAPO each raise the training reward over the base on held-out
prompts.
And the world itself is rebuilt bit for bit in another process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.cli import main
from world.build import build_world

pytestmark = pytest.mark.slow


def test_fast_demo_tgo_and_pnapo_raise_the_training_reward(tmp_path):
    world = build_world(tmp_path / "world", vae_steps=300, flow_steps=1400, classifier_steps=200,
                        n_train_prompts=60, n_eval_prompts=30)
    stamp = json.loads((world / "world.json").read_text())
    assert stamp["fidelity_accuracy_on_other_half"] > 0.85 and stamp["heldout_accuracy_on_other_half"] > 0.85
    rewards = (tmp_path / "world" / "rewards").as_posix()
    overrides = [
        f"run.output_dir={tmp_path / 'run'}", "run.executor=local",
        f"generate.model={world / 'base'}", f"generate.prompts={world / 'prompts' / 'train.txt'}",
        f"score.rewards=[{{name: fidelity, kind: 'world.rewards:DigitReward', checkpoint: {rewards}/fidelity}}]",
        "train.methods=[tgo, pnapo]", "train.per_method={tgo: {beta: 0.2}}", "train.max_steps=120",
        f"eval.prompts={world / 'prompts' / 'eval.txt'}",
        f"eval.rewards=[{{name: heldout, kind: 'world.rewards:DigitReward', checkpoint: {rewards}/heldout}}]",
    ]
    assert main(["run", "manifests/demo.yaml", *overrides]) == 0
    results = json.loads((tmp_path / "run" / "eval" / "results.json").read_text())
    deltas = {m["name"]: m["rewards"]["fidelity"]["vs_base"]["delta"] for m in results["models"] if m["name"] != "base"}
    assert set(deltas) == {"tgo", "pnapo"} and all(d > 0 for d in deltas.values()), deltas
    assert (tmp_path / "run" / "eval" / "report.html").exists()


WORLD_CHILD = """
import hashlib, pathlib, sys, torch
torch.randn(int(sys.argv[2]))  # each process has drawn different random numbers before the build
from world.build import build_world
root = build_world(pathlib.Path(sys.argv[1]), vae_steps=10, flow_steps=20, classifier_steps=10, n_train_prompts=10, n_eval_prompts=5)
for f in sorted(p for p in root.rglob("*") if p.is_file() and p.name != "world.json"):
    print(hashlib.sha256(f.read_bytes()).hexdigest(), f.relative_to(root))
"""


def test_world_build_is_bit_reproducible_across_processes(tmp_path):
    def build(name: str, hash_seed: str, draws: str) -> str:
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        cmd = [sys.executable, "-c", WORLD_CHILD, str(tmp_path / name), draws]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True, timeout=600).stdout

    first, second = build("a", "1", "3"), build("b", "2", "17")
    assert len(first.splitlines()) > 10 and first == second
