"""Pair stage: each strategy on constructed scores, gap filter and ties counted, noise carried, external import."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import load_manifest
from pipeline.errors import StageError
from pipeline.pair import run_pair
from pipeline.readers import to_hf
from pipeline.schema import noise_from_arrow
from pipeline.shards import open_dataset
from tests.conftest import write_manifest
from tests.synthetic import scored_dataset

PROMPTS = [
    {"a": [0.1, 0.9, 0.5, 0.3]},  # p0: best p0-1, worst p0-0
    {"a": [0.2, 0.2, 0.2, 0.2]},  # p1: all tied
    {"a": [1.0, 0.0, 0.95, 0.4]},  # p2
]


def pairs(tmp_path, pair: dict, per_prompt=PROMPTS):
    shards = [[0, 1], [2]] if len(per_prompt) == 3 else [list(range(len(per_prompt)))]
    scored_dataset(tmp_path / "out" / "scored", per_prompt, shards)
    data = {"run": {"name": "t", "output_dir": str(tmp_path / "out")}, "pair": {"reward": "a", **pair}}
    ds = open_dataset(run_pair(load_manifest(write_manifest(tmp_path / "m.yaml", data))), kind="pairs", verify=True)
    t = ds.read(["winner_id", "loser_id", "winner_score", "loser_score", "gap"]).to_pydict()
    return ds, list(zip(t["winner_id"], t["loser_id"], strict=True)), t


def test_best_worst(tmp_path):
    ds, got, t = pairs(tmp_path, {"strategy": "best_worst"})
    assert got == [("p0-1", "p0-0"), ("p2-0", "p2-1")]
    assert np.allclose(t["gap"], [0.8, 1.0]) and ds.stats["ties"] == 1  # p1's best == worst


def test_all_pairs_with_min_gap(tmp_path):
    ds, got, t = pairs(tmp_path, {"strategy": "all", "min_gap": 0.3})
    want = {(f"p{i}-{w}", f"p{i}-{l}") for i, p in enumerate(PROMPTS) for w in range(4) for l in range(4)
            if p["a"][w] - p["a"][l] >= 0.3 - 1e-7 and p["a"][w] > p["a"][l]}
    assert set(got) == want and len(got) == len(want)
    assert min(t["gap"]) >= 0.3 - 1e-6
    assert ds.stats["candidates"] == 3 * 6 and ds.stats["ties"] == 6  # p1's six pairs are all ties
    assert ds.stats["below_min_gap"] == 18 - 6 - len(want)


def test_top_bottom_k(tmp_path):
    _, got, _ = pairs(tmp_path, {"strategy": "top_bottom_k", "k": 2}, [PROMPTS[0], PROMPTS[2]])
    assert set(got[:4]) == {("p0-1", "p0-3"), ("p0-1", "p0-0"), ("p0-2", "p0-3"), ("p0-2", "p0-0")}
    assert len(got) == 8


def test_pairs_carry_both_prior_noises(tmp_path):
    ds, got, _ = pairs(tmp_path, {"strategy": "best_worst"})
    scored = open_dataset(tmp_path / "out" / "scored").read(["sample_id", "noise"])
    by_id = dict(zip(scored["sample_id"].to_pylist(), noise_from_arrow(scored["noise"], (4, 8, 8)), strict=True))
    table = ds.read(["winner_id", "loser_id", "winner_noise", "loser_noise"])
    w, l = noise_from_arrow(table["winner_noise"], (4, 8, 8)), noise_from_arrow(table["loser_noise"], (4, 8, 8))
    for i, (wid, lid) in enumerate(got):
        assert np.array_equal(w[i], by_id[wid]) and np.array_equal(l[i], by_id[lid])
    assert to_hf(ds.path).with_format("torch")[0]["winner_noise"].shape == (4, 8, 8)


def test_bad_reward_column(tmp_path):
    with pytest.raises(StageError, match="no score column 'score_zz'; this dataset has \\['score_a'\\]"):
        pairs(tmp_path, {"reward": "zz"})


def _png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (value, 0, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_external_import_drops_ties_and_has_no_noise(tmp_path):
    rows = [
        {"jpg_0": _png(1), "jpg_1": _png(2), "label_0": 1.0, "caption": "a cat"},
        {"jpg_0": _png(3), "jpg_1": _png(4), "label_0": 0.0, "caption": "a dog"},
        {"jpg_0": _png(5), "jpg_1": _png(6), "label_0": 0.5, "caption": "a tie"},
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pickapic.parquet")
    data = {"run": {"name": "t", "output_dir": str(tmp_path / "out")}, "pair": {"external": {"path": str(tmp_path / "pickapic.parquet")}}}
    ds = open_dataset(run_pair(load_manifest(write_manifest(tmp_path / "m.yaml", data))), kind="pairs", verify=True)
    assert ds.num_rows == 2 and ds.stats["ties"] == 1 and "winner_noise" not in ds.features
    hf = to_hf(ds.path)
    assert [hf[i]["winner_image"].getpixel((0, 0))[0] for i in range(2)] == [1, 4]
    assert hf[1]["prompt"] == "a dog"
    bad = {"run": data["run"], "pair": {"external": {"path": str(tmp_path / "pickapic.parquet"),
                                                      "columns": {"image_0": "img0", "image_1": "jpg_1", "label_0": "label_0", "prompt": "caption"}}}}
    with pytest.raises(StageError, match=r"columns \['img0'\] not found"):
        run_pair(load_manifest(write_manifest(tmp_path / "bad.yaml", bad)), overwrite=True)
