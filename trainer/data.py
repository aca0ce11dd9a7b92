"""Training batches streamed from dataset shards, identical for any number of processes, decoded ahead of the step.

An epoch is a seeded order of row groups, with rows shuffled inside each group; it is cut into global batches
of `global_batch` rows and process r of W takes rows [r*G/W, (r+1)*G/W) of each. Every process reads the same
Arrow rows (cheap) but decodes only its own slice (the costly part), so one process and W processes see the
same global batches, and a resumed run skips exactly the batches already consumed.

Decoding runs off the training thread, in a small thread pool that keeps `prefetch` batches in flight and
hands them over in order. Threads rather than DataLoader worker processes: the costly parts (Parquet reads,
PNG inflate in Pillow, numpy copies) release the GIL, and threads need no pickling of the dataset, no fork
next to a CUDA context, no per-epoch worker start-up, and they share the one sequential order of row groups
that makes the batches exact. Row groups are read one ahead in the same pool. When CUDA is available the
tensors come back in pinned memory, ready for `.to(device, non_blocking=True)`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
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
                 world_size: int = 1, seed: int = 0, kind: str | tuple[str, ...] | None = None,
                 workers: int = 4, prefetch: int = 4, pin_memory: bool | None = None):
        self.dataset = open_dataset(path, kind=kind, verify=True)
        self.features = self.dataset.features
        missing = [c for c in columns if c not in self.features]
        if missing:
            raise StageError(f"{path}: the training data has no column {missing}")
        if global_batch % world_size:
            raise StageError(f"train.batch_size {global_batch} is not divisible by the {world_size} processes")
        if self.dataset.num_rows < global_batch:
            raise StageError(f"{path}: {self.dataset.num_rows} rows, fewer than one batch of {global_batch}")
        if workers < 1 or prefetch < 1:
            raise StageError(f"the loader needs at least one worker and one batch of prefetch (got {workers}, {prefetch})")
        self.columns, self.global_batch = columns, global_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.workers, self.prefetch = workers, prefetch
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.groups = [(i, g) for i, p in enumerate(self.dataset.shard_paths) for g in range(pq.ParquetFile(p).num_row_groups)]

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset.num_rows // self.global_batch

    def _read(self, epoch: int, shard: int, group: int) -> pa.Table:
        table = pq.ParquetFile(self.dataset.shard_paths[shard]).read_row_group(group, columns=self.columns)
        perm = np.random.default_rng([self.seed, epoch, shard, group]).permutation(table.num_rows)
        return table.take(pa.array(perm))

    def _rows(self, epoch: int, pool: ThreadPoolExecutor) -> Iterator[pa.Table]:
        """The epoch's row groups in their seeded order, each read while the one before is being consumed."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.groups))
        reads: deque[Future[pa.Table]] = deque()
        for k in order:
            reads.append(pool.submit(self._read, epoch, *self.groups[k]))
            if len(reads) > 1:
                yield reads.popleft().result()
        while reads:
            yield reads.popleft().result()

    def _slices(self, epoch: int, skip: int, pool: ThreadPoolExecutor) -> Iterator[pa.Table]:
        """This process's rows of each global batch from the `skip`-th on (Arrow only, nothing decoded)."""
        buffer: list[pa.Table] = []
        size, index = 0, 0
        per_rank = self.global_batch // self.world_size
        for table in self._rows(epoch, pool):
            buffer.append(table)
            size += table.num_rows
            while size >= self.global_batch:
                merged = pa.concat_tables(buffer)
                batch, rest = merged.slice(0, self.global_batch), merged.slice(self.global_batch)
                buffer, size = [rest], rest.num_rows
                if index >= skip:
                    yield batch.slice(self.rank * per_rank, per_rank)
                index += 1

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict[str, Any]]:
        """This process's share of each global batch of `epoch`, after skipping `skip` batches."""
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="tauflow-data")
        try:
            pending: deque[Future[dict[str, Any]]] = deque()
            for table in self._slices(epoch, skip, pool):
                pending.append(pool.submit(self.to_tensors, table))
                if len(pending) >= self.prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # also when the consumer stops early: drop what was queued, do not wait for it
            pool.shutdown(wait=False, cancel_futures=True)

    def to_tensors(self, table: pa.Table) -> dict[str, Any]:
        """Images -> uint8 (N, 3, H, W); noise and latents -> float32 (N, C, H, W); strings -> lists; numbers ->
        float32 (N,)."""
        out: dict[str, Any] = {}
        for name in table.column_names:
            feature, column = self.features[name], table.column(name)
            if isinstance(feature, Image):
                pixels = np.stack([decode_png(v["bytes"]) for v in column.to_pylist()])
                out[name] = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous()
            elif isinstance(feature, Array3D):
                out[name] = torch.from_numpy(noise_from_arrow(column, feature.shape).astype(np.float32))
            elif pa.types.is_string(column.type):
                out[name] = column.to_pylist()
            else:
                out[name] = torch.from_numpy(column.to_numpy().astype(np.float32))
            if self.pin_memory and isinstance(out[name], torch.Tensor):
                out[name] = out[name].pin_memory()
        return out
