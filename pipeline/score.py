"""Score stage: every image of a samples dataset scored by the manifest's reward bank.

The scored dataset keeps every sample column (images and noise stay reachable without a join) and adds one
float32 column `score_<name>` per reward. Input shard i becomes output shard i. Run again with more rewards
listed, it scores only the new ones and replaces the dataset atomically with the widened one.
"""

from __future__ import annotations

import io
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import Manifest, RewardSpec
from pipeline.errors import StageError
from pipeline.executor import Resources, UnitWorker, run_units
from pipeline.generate import pick_device, record_runtime, recorded_runtime
from pipeline.schema import score_column, scored_features
from pipeline.shards import ShardRecord, ShardWriter, StageOutput, open_dataset, shard_name
from pipeline.stage import Score, Written

log = logging.getLogger("tauflow")


def decode_images(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """PIL images opened lazily (headers only): the pixels are decoded by the reward bank's decode threads."""
    from PIL import Image

    return [Image.open(io.BytesIO(v["bytes"])) for v in column.to_pylist()]


class ScoreWorker(UnitWorker):
    """Loads the bank once; scores one input shard per unit and writes the widened shard.

    The bank decodes and preprocesses on `decode_threads(cpus_per_worker)` threads, a batch ahead of the
    forward passes; in a Ray actor the forward passes get as many torch threads."""

    def __init__(self, specs: list[dict], source: str, out_dir: str, batch_size: int, device: str,
                 one_at_a_time: bool, cpus_per_worker: float, max_retries: int = 2, dtype: str = "auto",
                 threads: float | None = None):
        super().__init__(out_dir, max_retries, threads)
        from rewards.bank import RewardBank, decode_threads

        device = pick_device(device)
        self.bank = RewardBank([RewardSpec.model_validate(s) for s in specs], device, one_at_a_time, dtype,
                               decode_threads(cpus_per_worker))
        self.device = device
        self.source = open_dataset(source)
        self.features = scored_features(self.source.features, [s["name"] for s in specs])
        self.batch_size = batch_size

    def process(self, unit: dict[str, Any]) -> ShardRecord:
        """Score one shard while a background thread reads the columns that only pass through (noise,
        latents) and encodes each scored batch as a row group: the stage costs about what its scoring costs."""
        index, bs = unit["unit"], self.batch_size
        shard = self.source.shard_paths[index].name
        head = self.source.read_shard(index, ["image", "prompt", "sample_id"])
        schema = self.features.arrow_schema
        # the writer closes after the thread has finished its writes (or, on an error, is discarded after)
        with ShardWriter(self.out_dir, index, schema) as writer, ThreadPoolExecutor(max_workers=1) as background:
            rest = background.submit(self.source.read_shard, index, [c for c in self.source.features if c not in head.column_names])

            def write_batch(lo: int, scores: dict[str, np.ndarray]) -> None:
                part = rest.result().slice(lo, bs)
                columns = {c: head[c].slice(lo, bs) for c in head.column_names} | {c: part[c] for c in part.column_names}
                columns |= {score_column(name): pa.array(values) for name, values in scores.items()}
                writer.write(pa.table([columns[c] for c in schema.names], schema=schema))

            def batches():
                for lo in range(0, head.num_rows, bs):
                    part = head.slice(lo, bs)
                    yield decode_images(part["image"]), part["prompt"].to_pylist()

            writes, bad_ids = [], {spec.name: [] for spec in self.bank.specs}
            for lo, scores in zip(range(0, head.num_rows, bs), self.bank.iter_scores(batches)):
                for name, values in scores.items():
                    bad_ids[name] += np.asarray(head["sample_id"].slice(lo, bs))[~np.isfinite(values)].tolist()
                writes.append(background.submit(write_batch, lo, scores))
            for done in writes:
                done.result()
            for name, ids in bad_ids.items():
                if ids:  # the shard's temp file is discarded: NaN/inf is never written
                    raise StageError(f"reward {name} gave NaN/inf for {len(ids)} samples of {shard}: {ids[:5]}")
            record_runtime(self.out_dir, index, device=self.device, dtype=self.bank.dtype)
            return writer.commit()


def reward_stats(values: np.ndarray) -> dict[str, float]:
    q = np.percentile(values, [0, 5, 25, 50, 75, 95, 100])
    return {"mean": float(values.mean()), "std": float(values.std()),
            **dict(zip(["min", "p5", "p25", "p50", "p75", "p95", "max"], map(float, q)))}


def run_score(manifest: Manifest, *, overwrite: bool = False, executor: str | None = None) -> Path:
    """The score stage (pipeline.stage.Score): skipped when complete, widened when a reward is added."""
    return Score(manifest).execute(overwrite=overwrite, executor=executor)


def write_scores(stage: Score, out: StageOutput, executor: str | None) -> Written:
    """Score the samples, or only the new rewards of a finished scored dataset (into a copy beside it)."""
    cfg, run = stage.cfg, stage.manifest.run
    have = stage.scored
    if have:
        source = open_dataset(stage.output, kind="scored", verify=True)
        new = [s for s in cfg.rewards if s.name not in have]
        log.info("score: adding rewards %s to %s", [s.name for s in new], stage.output)
    else:
        source = open_dataset(stage.manifest.stage_dir("generate"), kind="samples", verify=True)
        new = list(cfg.rewards)
    num = len(source.shard_paths)
    units = [{"unit": i, "rows": s["rows"]} for i, s in enumerate(source.manifest["shards"])]
    pending = [units[i] for i in out.pending(num)]
    res = Resources(executor or run.executor, run.ray_address, cfg.num_workers, cfg.cpus_per_worker,
                    cfg.gpus_per_worker, cfg.max_retries)
    kwargs = {"specs": [s.model_dump(mode="json") for s in new], "source": str(source.path), "out_dir": str(out.path),
              "batch_size": cfg.batch_size, "device": cfg.device, "one_at_a_time": cfg.one_at_a_time,
              "cpus_per_worker": cfg.cpus_per_worker, "dtype": cfg.dtype}
    run_units(ScoreWorker, kwargs, pending, res, desc="score", rows_of=lambda u: u["rows"])
    features = scored_features(source.features, [s.name for s in new])
    columns = [c for c in features if c.startswith("score_")]
    table = pa.concat_tables([pq.read_table(out.path / shard_name(i), columns=columns) for i in range(num)])
    stats = {
        "rewards": {c.removeprefix("score_"): reward_stats(table[c].to_numpy()) for c in columns},
        "reward_specs": {**have, **stage.specs},
        "score_dtype": {**(source.stats.get("score_dtype", {}) if have else {}),
                        **dict.fromkeys([s.name for s in new], recorded_runtime(out.path, num, "dtype"))},
    }
    return Written(num, features, stats)
