"""Threshold stage: tau equals numpy.percentile in every mode; labels and weights exactly as the formulas."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.config import load_manifest
from pipeline.errors import StageError
from pipeline.inspect import describe
from pipeline.threshold import run_threshold
from pipeline.shards import open_dataset
from tests.conftest import write_manifest
from tests.synthetic import scored_dataset

RNG = np.random.default_rng(7)
K = 8
PROMPTS = [{"a": RNG.normal(i, 1, K).round(3).tolist(), "b": RNG.normal(0, 10, K).tolist()} for i in range(6)]


def setup(tmp_path, threshold: dict, per_prompt=PROMPTS, shards=None):
    scored_dataset(tmp_path / "out" / "scored", per_prompt, shards or [[0, 1, 2], [3, 4, 5]][: 1 + (len(per_prompt) > 3)])
    data = {"run": {"name": "t", "output_dir": str(tmp_path / "out")}, "threshold": threshold}
    return load_manifest(write_manifest(tmp_path / "m.yaml", data))


def labeled(manifest):
    ds = open_dataset(run_threshold(manifest), kind="labeled", verify=True)
    return ds, ds.read(["sample_id", "prompt_id", "score", "tau", "label", "weight"]).to_pydict()


def a_scores(per_prompt=PROMPTS) -> np.ndarray:
    return np.array([s for p in per_prompt for s in p["a"]], np.float32)


def test_global_tau_labels_and_weights(tmp_path):
    ds, t = labeled(setup(tmp_path, {"reward": "a", "percentile": 30, "c": 2.5}))
    s = a_scores()
    tau = np.percentile(s, 30)
    assert np.all(np.array(t["tau"]) == np.float32(tau))
    assert t["label"] == [int(x >= tau) for x in t["score"]]
    assert np.allclose(t["weight"], 1 + 2.5 * np.abs(np.array(t["score"], np.float64) - tau), rtol=1e-6)
    assert ds.stats["positives"] == int((s >= tau).sum()) and ds.stats["n"] == len(s)
    assert (ds.path / "thresholds.json").exists() and (ds.path / "hist_a.png").stat().st_size > 1000
    assert "thresholds.json" in describe(ds.path)


def test_per_prompt_tau_is_each_prompts_percentile(tmp_path):
    _, t = labeled(setup(tmp_path, {"reward": "a", "mode": "per_prompt", "percentile": 75}))
    for i, p in enumerate(PROMPTS):
        rows = [j for j, pid in enumerate(t["prompt_id"]) if pid == f"p{i}"]
        assert np.allclose([t["tau"][j] for j in rows], np.percentile(np.float32(p["a"]), 75), rtol=1e-6, atol=0)
        assert sum(t["label"][j] for j in rows) == 2  # top quarter of 8 (distinct scores)


def test_shrunk_tau_pulls_toward_global(tmp_path):
    _, t = labeled(setup(tmp_path, {"reward": "a", "mode": "shrunk", "k0": 4}))
    tau_g = np.percentile(a_scores(), 50)
    for i, p in enumerate(PROMPTS):
        want = (K / (K + 4)) * np.percentile(np.float32(p["a"]), 50) + (4 / (K + 4)) * tau_g
        got = t["tau"][t["prompt_id"].index(f"p{i}")]
        assert got == pytest.approx(want, rel=1e-6)


def test_composite_zscore_and_rank(tmp_path):
    _, t = labeled(setup(tmp_path, {"composite": {"weights": {"a": 1.0, "b": 0.5}, "normalize": "zscore"}}))
    a, b = a_scores(), np.array([s for p in PROMPTS for s in p["b"]], np.float32).astype(np.float64)
    want = (a - a.astype(np.float64).mean()) / a.astype(np.float64).std() + 0.5 * (b - b.mean()) / b.std()
    assert np.allclose(t["score"], want, atol=1e-5)
    assert t["tau"][0] == pytest.approx(np.percentile(np.float32(want), 50), abs=1e-6)
    _, r = labeled(setup(tmp_path / "r", {"composite": {"weights": {"a": 2.0}, "normalize": "rank"}}))
    ranks = (np.argsort(np.argsort(a, kind="stable"), kind="stable") + 1) / len(a)  # distinct scores: rank / n
    assert np.allclose(r["score"], 2.0 * ranks, atol=1e-6)


def test_normalized_gap_and_ties(tmp_path):
    prompts = [{"a": [1.0, 2.0, 2.0, 3.0]}, {"a": [2.0, 5.0, 0.0, 2.0]}]
    _, t = labeled(setup(tmp_path, {"reward": "a", "c": 5.0, "normalize_gap": True}, prompts, [[0, 1]]))
    s = np.array(t["score"], np.float64)
    assert t["tau"][0] == 2.0
    assert np.allclose(t["weight"], 1 + 5 * np.abs(s - 2.0) / np.float32(s).std(), rtol=1e-6)
    assert [t["label"][j] for j in range(len(s)) if s[j] == 2.0] == [1, 1, 1, 1]  # s == tau is a positive
    assert json.loads((tmp_path / "out" / "labeled" / "thresholds.json").read_text())["ties"] == 4


def test_tau_from_a_proxy_dataset(tmp_path):
    proxy = setup(tmp_path / "proxy", {"reward": "a", "percentile": 40})
    run_threshold(proxy)
    proxy_tau = np.percentile(a_scores(), 40)
    big = [{"a": (np.array(p["a"]) + 100).tolist(), "b": p["b"]} for p in PROMPTS]
    m = setup(tmp_path / "big", {"reward": "a", "percentile": 40, "tau_from": str(tmp_path / "proxy/out/labeled")}, big)
    _, t = labeled(m)
    assert t["tau"][0] == pytest.approx(proxy_tau) and all(t["label"])
    bad = setup(tmp_path / "bad", {"reward": "a", "percentile": 60, "tau_from": str(tmp_path / "proxy/out/labeled")})
    with pytest.raises(StageError, match="its tau is the 40.0th percentile, not the 60.0th"):
        run_threshold(bad)


def test_bad_inputs_give_clear_errors(tmp_path):
    with pytest.raises(StageError, match=r"no score column \['score_zz'\]; this dataset has \['score_a', 'score_b'\]"):
        run_threshold(setup(tmp_path / "1", {"reward": "zz"}))
    nan = [{"a": [float("nan")] * 4} for _ in range(2)]
    with pytest.raises(StageError, match=r"8 rows have a NaN/inf score \(sample ids \['p0-0', 'p0-1'"):
        run_threshold(setup(tmp_path / "2", {"reward": "a"}, nan, [[0, 1]]))
    with pytest.raises(StageError, match="no finite scores to threshold"):
        run_threshold(setup(tmp_path / "3", {"reward": "a", "nan_policy": "drop"}, nan, [[0, 1]]))
    single = [{"a": [float(i)]} for i in range(4)]
    with pytest.raises(StageError, match="per_prompt thresholds need >= 2 samples per prompt; prompt 'p0' has 1"):
        run_threshold(setup(tmp_path / "4", {"reward": "a", "mode": "per_prompt"}, single, [[0, 1, 2, 3]]))


def test_nan_rows_dropped_and_counted(tmp_path):
    prompts = [{"a": [1.0, float("nan"), 3.0]}, {"a": [4.0, 5.0, 6.0]}]
    ds, t = labeled(setup(tmp_path, {"reward": "a", "nan_policy": "drop"}, prompts, [[0, 1]]))
    assert "p0-1" not in t["sample_id"] and ds.num_rows == 5 and ds.stats["dropped_nan"] == 1
    assert t["tau"][0] == np.percentile([1, 3, 4, 5, 6], 50)


def test_prompt_split_across_shards_is_refused_for_per_prompt(tmp_path):
    from tests.synthetic import scored_dataset as make

    make(tmp_path / "out" / "scored", PROMPTS[:2], [[0, 1], [1]])
    data = {"run": {"name": "t", "output_dir": str(tmp_path / "out")}, "threshold": {"reward": "a", "mode": "per_prompt"}}
    with pytest.raises(StageError, match="prompt 'p1' has samples in more than one shard"):
        run_threshold(load_manifest(write_manifest(tmp_path / "m.yaml", data)))
