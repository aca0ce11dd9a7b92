"""The method study (benchmarks/study.py) end to end at a tiny scale: a tiny digits world, two seeds, a few steps.
It checks the pipeline of the study, not its findings: the report has the claims table, the forest plot and the
reward-vs-step curves, and a rerun skips every finished run."""

from __future__ import annotations

import json

import pytest

from benchmarks.study import QUICK, Scale, run_study, two_level
from world.build import build_world

pytestmark = pytest.mark.slow


@pytest.mark.study  # not in `make test`: `pytest -m study` runs it
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


def _eval(shift: float, rng, n_prompts: int = 6, k: int = 2) -> dict:
    """An eval's results.json for one tuned model whose scores are the base's plus `shift` (and noise)."""
    base = {r: rng.uniform(0.2, 0.8, n_prompts * k) for r in ("fidelity", "heldout")}
    tuned = {r: v + shift + rng.normal(0, 0.01, v.shape) for r, v in base.items()}
    return {"images_per_prompt": k, "rewards": ["fidelity", "heldout"],
            "scores": {"base": {r: v.tolist() for r, v in base.items()}, "m": {r: v.tolist() for r, v in tuned.items()}},
            "models": [{"name": "base", "rewards": {r: {"mean": float(v.mean())} for r, v in base.items()}},
                       {"name": "m", "drift": 0.02 + shift, "rewards": {}}]}


def test_claims_and_report_from_synthetic_runs(tmp_path):
    """The claims' verdicts follow the contrasts: here TGO is clearly best, fresh noise clearly worse."""
    import numpy as np

    from benchmarks.study import METHODS, claims, summary
    from benchmarks.study_report import write_study_report

    rng = np.random.default_rng(0)
    gain = {"tgo": 0.10, "kto": 0.06, "dpo": 0.03, "pnapo": 0.05, "sft": 0.02}
    main = {m: [_eval(gain[m], rng) for _ in range(3)] for m in METHODS}
    names = ["tgo c=0", "tgo percentile 30", "tgo percentile 70", "pnapo fresh noise", "pnapo gap off",
             "pnapo schedule off", "pnapo static beta"]
    runs = {"tgo (c=5, p50, global)": main["tgo"], "pnapo recorded noise": main["pnapo"],
            **{n: [_eval(0.0, rng) for _ in range(3)] for n in names}}
    curves = {m: [{"step": s, "heldout": gain[m] * s / 4, "fidelity": 0.0, "drift": 0.01 * s} for s in (0, 2, 4)] for m in METHODS}
    found = {c["claim"].split(":")[0].split(",")[0]: c["verdict"] for c in claims(main, runs, curves, 300)}
    assert found["TGO > Diffusion-KTO > Diffusion-DPO > base"] == "reproduced"
    assert found["PNAPO falsification test"] == "reproduced"
    assert found["PNAPO (recorded-noise surrogate) beats fresh-noise Diffusion-DPO"] == "reproduced"
    res = {"scale": {**QUICK.__dict__, "learning_rates": [1e-4]}, "main": {m: summary(e, 300) for m, e in main.items()},
           "ablations": {n: summary(e, 300) for n, e in runs.items()}, "chosen": {m: {"learning_rate": 1e-4} for m in METHODS},
           "base": {"fidelity": 0.5, "heldout": 0.5}, "curves": curves, "claims": claims(main, runs, curves, 300),
           "tuning": {m: [{"config": {"learning_rate": 1e-4}, "tune_delta": 0.1, "tune_ci": [0.0, 0.2], "drift": 0.02}]
                      for m in METHODS},
           "kto_logs": {"kto-s0": {"kto_z": 0.001, "implicit_acc": 0.6, "policy_error": 0.1}}, "seconds": 60.0,
           "tune_prompts": 40}
    write_study_report(res, tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| TGO > Diffusion-KTO > Diffusion-DPO > base, on every reward | reproduced |" in md
    assert "![forest plot](forest.png)" in md and (tmp_path / "forest.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "report.html").read_text().count("data:image/png;base64,") == 3
