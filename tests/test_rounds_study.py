"""The rounds study's bookkeeping (benchmarks/rounds_study.py): a finished arm is reused only when it was run with
the same manifest and budget, and the table pairs every arm with the one-round arm of the same seed."""

from __future__ import annotations

import hashlib
import json
from argparse import Namespace

import pytest

from benchmarks.rounds_study import ROOT, overrides, run_arm, table


def _args(tmp_path, **changes) -> Namespace:
    base = {"manifest": str(ROOT / "manifests/demo.yaml"), "out": tmp_path, "methods": ["tgo"], "rounds": [1, 2],
            "seeds": [0, 1], "prompts": 64, "images": 8, "steps": 128, "eval_images": 2, "tgo_beta": 0.2}
    return Namespace(**{**base, **changes})


def _finish(args: Namespace, method: str, n: int, seed: int, heldout: float) -> None:
    """Record an arm as run_arm would, by running nothing: its record with the settings of `args`."""
    out = args.out / f"{method}-r{n}-s{seed}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "timing.json").write_text("{}")
    with pytest.raises(SystemExit):  # a record without settings is not trusted
        run_arm(args, method, n, seed)
    made_with = {"manifest_sha256": hashlib.sha256(open(args.manifest, "rb").read()).hexdigest(),
                 "overrides": overrides(args, method, n, seed, out)}
    record = {"method": method, "rounds": n, "seed": seed, "made_with": made_with,
              "seconds": {"generate": 1.0, "train": 2.0}, "delta": {"heldout": heldout}, "delta_ci": {}}
    (out / "timing.json").write_text(json.dumps(record))


def test_a_finished_arm_is_reused_only_with_the_same_budget(tmp_path):
    args = _args(tmp_path)
    _finish(args, "tgo", 2, 0, 0.05)
    assert run_arm(args, "tgo", 2, 0)["delta"] == {"heldout": 0.05}
    with pytest.raises(SystemExit, match="other settings"):
        run_arm(_args(tmp_path, steps=64), "tgo", 2, 0)


def test_table_pairs_each_arm_with_one_round_of_the_same_seed(tmp_path):
    args = _args(tmp_path)
    deltas = {(1, 0): 0.01, (1, 1): 0.03, (2, 0): 0.04, (2, 1): 0.05}  # paired differences +0.03, +0.02
    for (n, seed), d in deltas.items():
        _finish(args, "tgo", n, seed, d)
    md = table(args, [run_arm(args, "tgo", n, s) for (n, s) in deltas])
    one, two = md.splitlines()[2:4]
    assert "| +0.020 [" in one and " |  | +0.010, +0.030 |" in one  # no paired cell for the 1-round arm itself
    # paired: mean +0.025, half-width t(1 df) 12.706 x sd 0.00707 / sqrt 2 = 0.0635
    assert "| +0.045 [" in two and "| +0.025 [-0.039, +0.089] | +0.040, +0.050 |" in two
