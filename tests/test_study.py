"""The method study (benchmarks/study.py) end to end at a tiny scale: a tiny digits world, two seeds, a few steps.
It checks the pipeline of the study, not its findings: the report has the claims table, the forest plot and the
reward-vs-step curves, and a rerun skips every finished run."""

from __future__ import annotations

import json

import pytest

from benchmarks.study import QUICK, Scale, run_study, two_level
from world.build import build_world

pytestmark = pytest.mark.slow


@pytest.mark.timeout(3600)  # ~60 training and eval runs of tiny models: minutes alone, much longer on a shared machine
def test_quick_study_writes_the_claims_and_the_forest_plot(tmp_path):
    world = build_world(tmp_path / "world", vae_steps=10, flow_steps=20, classifier_steps=10, n_train_prompts=10,
                        n_eval_prompts=4)
    scale = Scale(**{**QUICK.__dict__, "steps": 2, "curve_points": 2, "eval_prompts": 3, "min_gap": 0.0})
    res = run_study(world, tmp_path / "study", scale)
    md = (tmp_path / "study" / "report.md").read_text()
    assert "## Claims of the papers, in this world" in md and "![forest plot](forest.png)" in md
    claims = [c["claim"] for c in res["claims"]]
    assert len(claims) == 9 and all(c["verdict"].split(" (")[0] in ("reproduced", "not reproduced", "inconclusive")
                                    for c in res["claims"])
    assert all(line in md for line in claims)
    assert (tmp_path / "study" / "forest.png").read_bytes()[:4] == b"\x89PNG"
    assert set(res["main"]) == {"tgo", "dpo", "pnapo", "kto", "sft"} and res["main"]["tgo"]["n_seeds"] == 2
    assert [p["step"] for p in res["curves"]["dpo"]] == [0, 1, 2]
    page = (tmp_path / "study" / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    before = json.loads((tmp_path / "study" / "results.json").read_text())
    again = run_study(world, tmp_path / "study", scale)  # resumable: every run is skipped, the numbers are the same
    assert again["main"] == before["main"] and again["seconds"] < res["seconds"]


def test_two_level_bootstrap_widens_with_seed_spread():
    import numpy as np

    rng = np.random.default_rng(0)
    prompts = rng.normal(0.05, 0.01, size=(20, 2))
    same = two_level([prompts, prompts, prompts], 500)
    spread = two_level([prompts - 0.05, prompts, prompts + 0.05], 500)
    assert same["delta"] == pytest.approx(spread["delta"]) == pytest.approx(prompts.mean())
    assert spread["hi"] - spread["lo"] > 3 * (same["hi"] - same["lo"])
