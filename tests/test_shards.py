"""Shard format: every dataset kind round-trips through pyarrow, HF datasets and Ray Data; corruption is caught."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import DatasetError
from pipeline.readers import TorchShards, to_hf, to_ray
from pipeline.schema import KINDS
from pipeline.shards import MANIFEST_NAME, StageOutput, open_dataset
from tests.synthetic import NOISE_SHAPE, kind_table, samples_table, write_kind


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_pyarrow_and_hf(tmp_path, kind):
    path = write_kind(tmp_path / kind, kind)
    ds = open_dataset(path, kind=kind, verify=True)
    expected = [kind_table(kind, 6, seed=i) for i in range(2)]
    assert ds.read().equals(pa.concat_tables(expected))
    hf = to_hf(path)
    assert len(hf) == ds.num_rows == sum(t.num_rows for t in expected)
    row = hf.with_format("torch")[0]
    image_col = "image" if "image" in hf.features else "winner_image"
    noise_col = "noise" if "noise" in hf.features else "winner_noise"
    assert tuple(row[noise_col].shape) == NOISE_SHAPE
    assert hf[0][image_col].size == (8, 8)  # decoded to PIL
    assert "huggingface" in {k.decode() for k in pq.read_schema(ds.shard_paths[0]).metadata}


def test_hf_reads_without_tauflow(tmp_path):
    """The README's three lines: plain `datasets` decodes images and shaped noise from the metadata alone."""
    path = write_kind(tmp_path / "s", "samples")
    code = (
        "import datasets, glob, sys;"
        f"ds = datasets.load_dataset('parquet', data_files=sorted(glob.glob('{path}/*.parquet')), split='train');"
        "r = ds.with_format('numpy')[0]; print(type(ds[0]['image']).__name__, r['noise'].shape)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, check=True)
    assert "PngImageFile (4, 8, 8)" in out.stdout


@pytest.mark.ray
def test_round_trip_ray(tmp_path, ray_local):
    path = write_kind(tmp_path / "s", "scored")
    rows = to_ray(path).take_all()
    assert len(rows) == 12
    assert sorted(r["sample_id"] for r in rows) == sorted(open_dataset(path).read(["sample_id"])["sample_id"].to_pylist())
    noise = np.asarray(rows[0]["noise"], dtype=np.float32)
    assert noise.shape == NOISE_SHAPE


def test_torch_reader_splits_by_rank_and_keeps_every_row_once(tmp_path):
    path = write_kind(tmp_path / "s", "samples", shards=3, rows=6)
    seen = []
    for rank in range(2):
        reader = TorchShards(path, rank=rank, world_size=2, shuffle=True, seed=1)
        rows = list(reader)
        assert rows and rows[0]["noise"].shape == NOISE_SHAPE and rows[0]["image"].shape == (3, 8, 8)
        seen += [r["sample_id"] for r in rows]
    assert sorted(seen) == sorted(open_dataset(path).read(["sample_id"])["sample_id"].to_pylist())
    again = [r["sample_id"] for r in TorchShards(path, rank=0, world_size=2, shuffle=True, seed=1)]
    assert again == [r["sample_id"] for r in TorchShards(path, rank=0, world_size=2, shuffle=True, seed=1)]


def test_noise_is_stored_exactly(tmp_path):
    table, noise = samples_table(5)
    out = StageOutput(tmp_path / "d", kind="samples", stage="t", config_hash="h")
    out.write(0, table)
    out.finalize(num_shards=1, features=__import__("datasets").Features.from_arrow_schema(table.schema), config={})
    rows = list(TorchShards(tmp_path / "d"))
    assert np.array_equal(np.stack([r["noise"].numpy() for r in rows]), noise)


def test_checksum_mismatch_is_detected(tmp_path):
    path = write_kind(tmp_path / "s", "samples")
    shard = path / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    open_dataset(path)  # same size: only the hash can tell
    with pytest.raises(DatasetError, match=r"part-00001.parquet: sha256 .* does not match"):
        open_dataset(path, verify=True)


def test_truncated_shard_is_detected(tmp_path):
    path = write_kind(tmp_path / "s", "samples")
    shard = path / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(DatasetError, match=r"part-00000.parquet: size \d+ bytes, manifest says \d+ \(truncated"):
        open_dataset(path)


def test_missing_manifest_shard_and_wrong_kind(tmp_path):
    path = write_kind(tmp_path / "s", "samples")
    with pytest.raises(DatasetError, match="is a 'samples' dataset, expected pairs"):
        open_dataset(path, kind="pairs")
    (path / "part-00001.parquet").unlink()
    with pytest.raises(DatasetError, match="part-00001.parquet: shard listed in the manifest is missing"):
        open_dataset(path)
    (path / MANIFEST_NAME).unlink()
    with pytest.raises(DatasetError, match="manifest.json: missing: the dataset is incomplete"):
        open_dataset(path)
    (path / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(DatasetError, match="manifest.json: not a valid dataset manifest"):
        open_dataset(path)


def test_wrong_column_type_names_file_and_column(tmp_path):
    path = write_kind(tmp_path / "s", "samples")
    table = pq.read_table(path / "part-00000.parquet")
    bad = table.set_column(table.schema.get_field_index("seed"), "seed", table["seed"].cast("string"))
    pq.write_table(bad, path / "part-00000.parquet")
    manifest = json.loads((path / MANIFEST_NAME).read_text())
    manifest["shards"][0]["bytes"] = (path / "part-00000.parquet").stat().st_size
    (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="part-00000.parquet: column 'seed' has type string, expected int64"):
        open_dataset(path).read()


def test_resume_refuses_a_different_config_and_unknown_shards(tmp_path):
    out = StageOutput(tmp_path / "d", kind="samples", stage="t", config_hash="one")
    out.write(0, kind_table("samples", 3))
    with pytest.raises(DatasetError, match="started with a different configuration"):
        StageOutput(tmp_path / "d", kind="samples", stage="t", config_hash="two")
    again = StageOutput(tmp_path / "d", kind="samples", stage="t", config_hash="one")
    assert again.pending(3) == [1, 2]
    fresh = StageOutput(tmp_path / "d", kind="samples", stage="t", config_hash="two", overwrite=True)
    assert fresh.pending(3) == [0, 1, 2]


WRITER = """
import sys, numpy as np, pyarrow as pa
from pipeline.shards import StageOutput
big = pa.table({"x": np.random.default_rng(0).random(60_000_000)})
out = StageOutput(sys.argv[1], kind="samples", stage="t", config_hash="h")
print("writing", flush=True)
out.write(0, big)
"""


def test_writer_killed_mid_shard_leaves_nothing_that_verifies(tmp_path):
    target = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.time() + 60
    while not list(target.glob(".part-00000.parquet.tmp-*")) and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (target / "part-00000.parquet").exists()
    out = StageOutput(target, kind="samples", stage="t", config_hash="h")
    assert out.pending(1) == [0]
    assert not list(target.glob(".part-*"))  # the stale temp file is cleaned on restart
    with pytest.raises(DatasetError, match="missing: the dataset is incomplete"):
        open_dataset(target)


def test_resume_redoes_a_finished_shard_whose_bytes_changed(tmp_path):
    out = StageOutput(tmp_path / "d", kind="samples", stage="t", config_hash="h")
    out.write(0, kind_table("samples", 3))
    out.write(1, kind_table("samples", 3, seed=1))
    shard = tmp_path / "d" / "part-00001.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the recorded sha256 can tell
    shard.write_bytes(bytes(data))
    assert StageOutput(tmp_path / "d", kind="samples", stage="t", config_hash="h").pending(2) == [1]


@pytest.mark.parametrize("cut", ["after_first_rename", "after_second_rename", "new_incomplete"])
def test_an_interrupted_dataset_swap_is_completed_or_undone(tmp_path, cut):
    from pipeline.shards import finish_replace

    target = write_kind(tmp_path / "scored", "scored", shards=1)
    new = write_kind(tmp_path / "scored.adding", "scored", shards=2)
    old = tmp_path / ".scored.old"
    before_old, before_new = open_dataset(target).read(), open_dataset(new).read()
    os.replace(target, old)  # the crash points of replace_dataset
    if cut == "after_second_rename":
        os.replace(new, target)
    if cut == "new_incomplete":
        (new / MANIFEST_NAME).unlink()
    finish_replace(target)
    expected = before_old if cut == "new_incomplete" else before_new
    assert open_dataset(target, verify=True).read().equals(expected) and not old.exists()
