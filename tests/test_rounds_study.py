"""The rounds study's bookkeeping (benchmarks/rounds_study.py): a finished arm is reused only when it was run with
the same settings, and the table pairs every arm with the one-round arm of the same seed."""

from __future__ import annotations

import json
from argparse import Namespace

import pytest

from benchmarks.rounds_study import made_with_hash, run_arm, table
from tests.conftest import write_manifest


@pytest.fixture
def args(tmp_path, tiny_model):
    """args(**changes): the study's arguments over a small manifest of the tiny SD3 pipeline (like the demo's)."""
    (tmp_path / "prompts.txt").write_text("a red cat\na blue dog\n")
    data = {
        "run": {"name": "r", "output_dir": "out", "executor": "local"},
        "generate": {"model": str(tiny_model("sd3")), "prompts": str(tmp_path / "prompts.txt"), "height": 16, "width": 16},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}]},
        "threshold": {"reward": "bright"}, "pair": {"reward": "bright"},
        "train": {"method": "tgo"}, "eval": {"prompts": str(tmp_path / "prompts.txt")},
    }
    manifest = write_manifest(tmp_path / "m.yaml", data)
    base = {"manifest": str(manifest), "out": tmp_path / "study", "methods": ["tgo"], "rounds": [1, 2], "seeds": [0, 1],
            "prompts": 64, "images": 8, "steps": 128, "eval_images": 2, "tgo_beta": 0.2}
    return lambda **changes: Namespace(**{**base, **changes})


def _finish(args: Namespace, method: str, n: int, seed: int, heldout: float) -> None:
    """Record an arm as run_arm would, by running nothing: its record with the settings of `args`."""
    out = args.out / f"{method}-r{n}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing.json").write_text("{}")
    with pytest.raises(SystemExit):  # a record without settings is not trusted
        run_arm(args, method, n, seed)
    record = {"method": method, "rounds": n, "seed": seed, "made_with": made_with_hash(args, method, n, seed),
              "seconds": {"generate": 1.0, "train": 2.0}, "delta": {"heldout": heldout}, "delta_ci": {}}
    (out / "timing.json").write_text(json.dumps(record))


def test_a_finished_arm_is_reused_only_with_the_same_budget(args):
    _finish(args(), "tgo", 2, 0, 0.05)
    assert run_arm(args(), "tgo", 2, 0)["delta"] == {"heldout": 0.05}
    with pytest.raises(SystemExit, match="other settings"):
        run_arm(args(steps=64), "tgo", 2, 0)


def test_table_pairs_each_arm_with_one_round_of_the_same_seed(args):
    args = args()
    deltas = {(1, 0): 0.01, (1, 1): 0.03, (2, 0): 0.04, (2, 1): 0.05}  # paired differences +0.03, +0.02
    for (n, seed), d in deltas.items():
        _finish(args, "tgo", n, seed, d)
    md = table(args, [run_arm(args, "tgo", n, s) for (n, s) in deltas])
    one, two = md.splitlines()[2:4]
    assert "| +0.020 [" in one and " |  | +0.010, +0.030 |" in one  # no paired cell for the 1-round arm itself
    # paired: mean +0.025, half-width t(1 df) 12.706 x sd 0.00707 / sqrt 2 = 0.0635
    assert "| +0.045 [" in two and "| +0.025 [-0.039, +0.089] | +0.040, +0.050 |" in two
