"""Training batches streamed from dataset shards, identical for any number of processes.

An epoch is a seeded order of row groups, with rows shuffled inside each group; it is cut into global batches
of `global_batch` rows and process r of W takes rows [r*G/W, (r+1)*G/W) of each. Every process reads the same
Arrow rows (cheap) but decodes only its own slice (the costly part), so one process and W processes see the
same global batches, and a resumed run skips exactly the batches already consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Array3D, Image

from pipeline.errors import StageError
from pipeline.readers import decode_png
from pipeline.schema import noise_from_arrow
from pipeline.shards import open_dataset


class GlobalBatches:
    def __init__(self, path: str | Path, columns: list[str], global_batch: int, *, rank: int = 0,
                 world_size: int = 1, seed: int = 0, kind: str | tuple[str, ...] | None = None):
        self.dataset = open_dataset(path, kind=kind, verify=True)
        missing = [c for c in columns if c not in self.dataset.features]
        if missing:
            raise StageError(f"{path}: the training data has no column {missing}")
        if global_batch % world_size:
            raise StageError(f"train.batch_size {global_batch} is not divisible by the {world_size} processes")
        if self.dataset.num_rows < global_batch:
            raise StageError(f"{path}: {self.dataset.num_rows} rows, fewer than one batch of {global_batch}")
        self.columns, self.global_batch = columns, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.groups = [(i, g) for i, p in enumerate(self.dataset.shard_paths) for g in range(pq.ParquetFile(p).num_row_groups)]

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.num_rows // self.global_batch

    def _rows(self, epoch: int) -> Iterator[pa.Table]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        for k in order:
            shard, group = self.groups[k]
            table = pq.ParquetFile(self.dataset.shard_paths[shard]).read_row_group(group, columns=self.columns)
            perm = np.random.default_rng([self.seed, epoch, shard, group]).permutation(table.num_rows)
            yield table.take(pa.array(perm))

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """This process's share of each global batch of `epoch`, after skipping `skip` batches."""
        buffer: list[pa.Table] = []
        size, index = 0, 0
        per_rank = self.global_batch // self.world_size
        for table in self._rows(epoch):
            buffer.append(table)
            size += table.num_rows
            while size >= self.global_batch:
                merged = pa.concat_tables(buffer)
                batch, rest = merged.slice(0, self.global_batch), merged.slice(self.global_batch)
                buffer, size = [rest], rest.num_rows
                if index >= skip:
                    yield self.to_tensors(batch.slice(self.rank * per_rank, per_rank))
                index += 1

    def to_tensors(self, table: pa.Table) -> dict[str, Any]:
        features = self.dataset.features
        out: dict[str, Any] = {}
        for name in table.column_names:
            feature, column = features[name], table.column(name)
            if isinstance(feature, Image):
                out[name] = torch.stack([torch.from_numpy(decode_png(v["bytes"]).copy()).permute(2, 0, 1)
                                         for v in column.to_pylist()])
            elif isinstance(feature, Array3D):
                out[name] = torch.from_numpy(noise_from_arrow(column, feature.shape).astype(np.float32))
            elif pa.types.is_string(column.type):
                out[name] = column.to_pylist()
            else:
                out[name] = torch.from_numpy(column.to_numpy().astype(np.float32))
        return out
