"""Per-prompt grouping that streams shard by shard.

The generate stage writes all K samples of a prompt into one shard, so per-prompt statistics never need the
whole dataset in memory: each shard is grouped on its own. `check_prompts_unique_across` verifies the
assumption (a dataset assembled elsewhere might split a prompt) with one vectorised pass over prompt ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import StageError


@dataclass(frozen=True)
class Groups:
    """Rows of one shard grouped by prompt, in order of first appearance."""

    codes: np.ndarray  # group index of each row
    prompt_ids: pa.Array  # id of each group

    @classmethod
    def of(cls, prompt_id: pa.ChunkedArray | pa.Array) -> Groups:
        encoded = pc.dictionary_encode(prompt_id)
        if isinstance(encoded, pa.ChunkedArray):
            encoded = encoded.combine_chunks()
        return cls(encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary)

    @property
    def count(self) -> int:
        return len(self.prompt_ids)

    @property
    def sizes(self) -> np.ndarray:
        return np.bincount(self.codes, minlength=self.count)

    def sorted_by(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Row order that sorts by (group, value), and each group's start offset in that order."""
        order = np.lexsort((values, self.codes))
        offsets = np.concatenate([[0], np.cumsum(self.sizes)])
        return order, offsets


def group_percentile(values: np.ndarray, groups: Groups, p: float) -> np.ndarray:
    """numpy.percentile(values[group], p) (linear method) for every group at once."""
    order, offsets = groups.sorted_by(values)
    v = values[order]
    sizes = np.diff(offsets)
    h = (sizes - 1) * (p / 100.0)
    lo = np.floor(h).astype(np.int64)
    hi = np.minimum(lo + 1, sizes - 1)
    frac = (h - lo).astype(values.dtype)
    a, b = v[offsets[:-1] + lo], v[offsets[:-1] + hi]
    diff = b - a
    # numpy's _lerp: a + diff * t, computed from the upper end when t >= 0.5 for monotonicity
    return np.where(frac >= 0.5, b - diff * (1 - frac), a + diff * frac)


def check_prompts_unique_across(shard_prompt_ids: list[pa.Array], where: str) -> None:
    if len(shard_prompt_ids) < 2:
        return
    everything = pa.concat_arrays(shard_prompt_ids)
    if len(pc.unique(everything)) != len(everything):
        counts = pc.value_counts(everything)
        repeated = counts.filter(pc.greater(counts.field("counts"), 1)).field("values")[0].as_py()
        raise StageError(
            f"{where}: prompt {repeated!r} has samples in more than one shard; per-prompt statistics need each "
            "prompt's samples in one shard (as the generate stage writes them)"
        )
