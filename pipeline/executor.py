"""Runs a stage's work units, locally in-process or on a Ray actor pool; the steps never know which.

A unit is a JSON-able dict with an integer "unit" key; a worker turns one unit into one shard and returns
its ShardRecord. Unit failures are retried `max_retries` times (exceptions inside the worker, and worker
process deaths on Ray); a unit that still fails stops the run with its error, keeping the shards written.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.errors import StageError
from pipeline.faults import crash_point
from pipeline.shards import PROGRESS_DIR, ShardRecord

log = logging.getLogger("tauflow")


@dataclass(frozen=True)
class Resources:
    executor: str = "local"  # "local" or "ray"
    address: str | None = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_retries: int = 2


class UnitWorker:
    """Base of stage workers: `process(unit) -> ShardRecord`; `__call__` is the Ray Data batch UDF.

    Each start of a unit is counted in `<out_dir>/.progress/attempts-<unit>`, so a unit whose worker process
    keeps dying (which Ray restarts and retries) also stops after `max_retries` retries.
    """

    def __init__(self, out_dir: str, max_retries: int = 2, threads: float | None = None):
        """`threads`: torch's thread count for a process the executor owns (a Ray actor, given its CPUs). The local
        executor passes none: it runs in the caller's process, whose later stages must not inherit a changed count
        (training after a local generate would differ from training alone at rounding level)."""
        self.out_dir = Path(out_dir)
        self.max_retries = max_retries
        if threads is not None:
            import torch

            torch.set_num_threads(max(1, int(threads)))

    def _count_start(self, unit: int) -> int:
        counter = self.out_dir / PROGRESS_DIR / f"attempts-{unit}"
        starts = int(counter.read_text() or 0) + 1 if counter.exists() else 1
        counter.write_text(str(starts))
        return starts

    def process(self, unit: dict[str, Any]) -> ShardRecord:
        raise NotImplementedError

    def run_unit(self, unit: dict[str, Any]) -> ShardRecord:
        if self._count_start(unit["unit"]) > self.max_retries + 1:
            raise StageError(f"unit {unit['unit']}: its worker died {self.max_retries + 1} times; giving up")
        crash_point(f"unit-start:{unit['unit']}")
        for attempt in range(self.max_retries + 1):
            try:
                return self.process(unit)
            except StageError:
                raise  # bad input: retrying cannot help
            except Exception as err:
                if attempt == self.max_retries:
                    raise StageError(f"unit {unit['unit']} failed after {attempt + 1} attempts: {err!r}") from err
                log.warning("unit %s failed (attempt %d): %r; retrying", unit["unit"], attempt + 1, err)
        raise AssertionError("unreachable")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        records = [self.run_unit(json.loads(payload)) for payload in batch["payload"]]
        return {"record": [json.dumps(asdict(r)) for r in records]}


def _progress(desc: str) -> Progress:
    return Progress(
        TextColumn(f"[bold]{desc}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        transient=False,
    )


def init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=True, configure_logging=False)


def forwarded_env() -> dict[str, str]:
    """Settings that workers must share with the driver (tauflow's own, and HF offline/cache settings)."""
    return {k: v for k, v in os.environ.items() if k.startswith(("TAUFLOW_", "HF_"))}


def _ray_records(
    factory: type[UnitWorker], kwargs: dict[str, Any], units: list[dict[str, Any]], res: Resources
) -> Iterator[ShardRecord]:
    import ray.data

    init_ray(res.address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds = ray.data.from_items([{"payload": json.dumps(u)} for u in units], override_num_blocks=len(units))
    ds = ds.map_batches(
        factory,
        fn_constructor_kwargs={**kwargs, "threads": res.cpus_per_worker},
        batch_size=1,
        # One unit in flight per actor: a unit's start count then blames only the unit that killed its
        # worker, and units are taken in order (a queued unit is never retried for another unit's crash).
        # Units run for seconds to minutes, so the lost prefetch of a tiny payload costs nothing.
        compute=ray.data.ActorPoolStrategy(size=min(res.num_workers, len(units)), max_tasks_in_flight_per_actor=1),
        num_cpus=res.cpus_per_worker,
        num_gpus=res.gpus_per_worker,
        runtime_env={"env_vars": forwarded_env()},
    )
    try:
        for row in ds.iter_rows():
            yield ShardRecord(**json.loads(row["record"]))
    except StageError:
        raise
    except Exception as err:  # Ray wraps worker errors; surface the root cause in one line
        cause = err
        while getattr(cause, "__cause__", None) is not None:
            cause = cause.__cause__
        raise StageError(f"the Ray job failed: {cause}") from err


def run_units(
    factory: type[UnitWorker],
    kwargs: dict[str, Any],
    units: list[dict[str, Any]],
    res: Resources,
    *,
    desc: str,
    rows_of: Callable[[dict[str, Any]], int],
) -> list[ShardRecord]:
    """Process every unit, showing rows/s; returns the records in completion order."""
    if not units:
        return []
    total = sum(rows_of(u) for u in units)
    kwargs = {**kwargs, "max_retries": res.max_retries}
    records: list[ShardRecord] = []
    start = time.perf_counter()
    with _progress(desc) as bar:
        task = bar.add_task(desc, total=total, rate="")
        if res.executor == "ray":
            stream = _ray_records(factory, kwargs, units, res)
        else:
            worker = factory(**kwargs)
            stream = (worker.run_unit(u) for u in units)
        for record in stream:
            records.append(record)
            done = sum(r.rows for r in records)
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done, rate=f"{rate:.1f} rows/s")
    return records
