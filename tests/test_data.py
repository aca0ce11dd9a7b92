"""The prefetching loader against a plain synchronous reading of the same rows."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from tests.synthetic import NOISE_SHAPE, write_kind

from pipeline.errors import StageError
from pipeline.shards import open_dataset
from trainer.data import GlobalBatches

PAIR_COLUMNS = ["pair_id", "prompt", "winner_image", "loser_image", "winner_noise", "gap"]
LABELED_COLUMNS = ["sample_id", "prompt", "image", "label", "weight", "latent"]


def reference_batches(path: Path, columns: list[str], global_batch: int, seed: int, epoch: int) -> list[dict]:
    """The documented order, read the slow obvious way: groups in the seeded order, rows shuffled per group,
    concatenated, cut into whole global batches; images decoded with PIL row by row."""
    shards = open_dataset(path).shard_paths
    groups = [(s, g) for s, p in enumerate(shards) for g in range(pq.ParquetFile(p).num_row_groups)]
    rows: list[dict] = []
    for k in np.random.default_rng([seed, epoch]).permutation(len(groups)):
        s, g = groups[k]
        group = pq.ParquetFile(shards[s]).read_row_group(g, columns=columns).to_pylist()
        rows += [group[i] for i in np.random.default_rng([seed, epoch, s, g]).permutation(len(group))]
    batches = []
    for start in range(0, len(rows) - global_batch + 1, global_batch):
        chunk = rows[start : start + global_batch]
        batch = {}
        for name in columns:
            values = [r[name] for r in chunk]
            if name.endswith("image"):
                batch[name] = torch.stack([torch.tensor(np.array(Image.open(io.BytesIO(v["bytes"])).convert("RGB"))).permute(2, 0, 1)
                                           for v in values])
            elif name.endswith(("noise", "latent")):
                batch[name] = torch.tensor(np.array(values, dtype=np.float32).reshape(len(values), *NOISE_SHAPE))
            elif isinstance(values[0], str):
                batch[name] = values
            else:
                batch[name] = torch.tensor(values, dtype=torch.float32)
        batches.append(batch)
    return batches


def assert_same(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for name, value in want.items():
        if isinstance(value, torch.Tensor):
            assert got[name].dtype == value.dtype, name
            assert torch.equal(got[name], value), name
        else:
            assert got[name] == value, name


def cat(parts: list[dict]) -> dict:
    return {k: torch.cat([p[k] for p in parts]) if isinstance(parts[0][k], torch.Tensor) else sum((p[k] for p in parts), [])
            for k in parts[0]}


@pytest.mark.parametrize(("kind", "columns", "batch"), [("pairs", PAIR_COLUMNS, 2), ("labeled", LABELED_COLUMNS, 4)])
def test_prefetching_loader_matches_a_plain_reading(tmp_path: Path, kind: str, columns: list[str], batch: int) -> None:
    path = write_kind(tmp_path / kind, kind, shards=3, rows=6 if kind == "pairs" else 5)  # batches span shards
    loader = GlobalBatches(path, columns, batch, seed=7, kind=kind, workers=3, prefetch=2)
    for epoch in (0, 1):
        want = reference_batches(path, columns, batch, seed=7, epoch=epoch)
        got = list(loader.epoch(epoch))
        assert len(got) == len(want) == loader.batches_per_epoch
        for g, w in zip(got, want, strict=True):
            assert_same(g, w)
    assert [b["prompt"] for b in loader.epoch(0)] != [b["prompt"] for b in loader.epoch(1)]  # epochs reshuffle


def test_images_decode_to_their_pixels(tmp_path: Path) -> None:
    path = write_kind(tmp_path / "l", "labeled", shards=1, rows=4)
    batch = next(GlobalBatches(path, ["image"], 4, workers=1, prefetch=1).epoch(0))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 8, 8)
    assert batch["image"].is_contiguous()
    stored = pq.read_table(open_dataset(path).shard_paths[0], columns=["image"]).column("image").to_pylist()
    decoded = {np.array(Image.open(io.BytesIO(v["bytes"]))).tobytes() for v in stored}
    assert {img.permute(1, 2, 0).numpy().tobytes() for img in batch["image"]} == decoded
    assert len(decoded) == 4  # random images: a swapped or repeated row would show


def test_skip_resumes_exactly(tmp_path: Path) -> None:
    path = write_kind(tmp_path / "l", "labeled", shards=3, rows=5)
    loader = GlobalBatches(path, LABELED_COLUMNS, 3, seed=1, prefetch=3)
    full = list(loader.epoch(2))
    assert len(full) == 5
    for skip in (1, 4, 5):
        resumed = list(loader.epoch(2, skip=skip))
        assert len(resumed) == len(full) - skip
        for g, w in zip(resumed, full[skip:], strict=True):
            assert_same(g, w)


def test_two_ranks_concatenate_to_one(tmp_path: Path) -> None:
    path = write_kind(tmp_path / "p", "pairs", shards=3, rows=6)
    one = list(GlobalBatches(path, PAIR_COLUMNS, 4, seed=3, kind="pairs").epoch(0))
    ranks = [list(GlobalBatches(path, PAIR_COLUMNS, 4, rank=r, world_size=2, seed=3, kind="pairs").epoch(0)) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 2
    for whole, r0, r1 in zip(one, *ranks, strict=True):
        assert len(r0["pair_id"]) == len(r1["pair_id"]) == 2
        assert_same(cat([r0, r1]), whole)


def test_stopping_early_and_bad_settings(tmp_path: Path) -> None:
    path = write_kind(tmp_path / "l", "labeled", shards=2, rows=6)
    batches = GlobalBatches(path, LABELED_COLUMNS, 2).epoch(0)
    next(batches)
    batches.close()  # an abandoned epoch shuts its pool down
    with pytest.raises(StageError, match="not divisible"):
        GlobalBatches(path, LABELED_COLUMNS, 3, world_size=2)
    with pytest.raises(StageError, match="no column"):
        GlobalBatches(path, ["winner_image"], 2)
