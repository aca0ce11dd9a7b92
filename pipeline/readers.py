"""Views of a complete dataset for users' code: HF datasets, Ray Data, and a rank-aware torch iterable."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Array3D, Image

from pipeline.schema import noise_from_arrow
from pipeline.shards import Dataset, open_dataset


def to_hf(path: str | Path, *, streaming: bool = False, verify: bool = True):
    """A `datasets.Dataset` (or `IterableDataset` when streaming); images decode to PIL, noise to arrays."""
    import datasets

    ds = open_dataset(path, verify=verify)
    files = [str(p) for p in ds.shard_paths]
    return datasets.load_dataset("parquet", data_files=files, split="train", streaming=streaming, features=ds.features)


def to_ray(path: str | Path, *, verify: bool = True):
    """A `ray.data.Dataset` over the shards (starts or joins Ray as `ray.data` does)."""
    import ray.data

    ds = open_dataset(path, verify=verify)
    return ray.data.read_parquet([str(p) for p in ds.shard_paths])


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> (H, W, C) uint8 array."""
    from PIL import Image as PILImage

    with PILImage.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


class TorchShards(torch.utils.data.IterableDataset):
    """Rows of a dataset as dicts of tensors, split by (rank, dataloader worker) over row groups.

    Every row is seen exactly once per epoch across all ranks and workers. With `shuffle`, the order of row
    groups and of rows within them is a function of (seed, epoch) only.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        columns: list[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = False,
        seed: int = 0,
        verify: bool = True,
    ):
        self.dataset: Dataset = open_dataset(path, verify=verify)
        self.columns = columns
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.units = [
            (i, g) for i, p in enumerate(self.dataset.shard_paths) for g in range(pq.ParquetFile(p).num_row_groups)
        ]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _my_units(self) -> list[tuple[int, int]]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        units = list(self.units)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(len(units))
            units = [units[i] for i in order]
        slot, slots = self.rank * workers + worker, self.world_size * workers
        return units[slot::slots]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        features = self.dataset.features
        for shard, group in self._my_units():
            table = pq.ParquetFile(self.dataset.shard_paths[shard]).read_row_group(group, columns=self.columns)
            columns = {name: self._column(table.column(name), features[name]) for name in table.column_names}
            order = np.arange(table.num_rows)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch, shard, group]).permutation(table.num_rows)
            for i in order:
                yield {name: values[i] for name, values in columns.items()}

    @staticmethod
    def _column(column: pa.ChunkedArray, feature: Any) -> Any:
        if isinstance(feature, Array3D):
            return torch.from_numpy(noise_from_arrow(column, feature.shape).copy())
        if isinstance(feature, Image):
            return [torch.from_numpy(decode_png(v["bytes"]).copy()).permute(2, 0, 1) for v in column.to_pylist()]
        return column.to_pylist()
