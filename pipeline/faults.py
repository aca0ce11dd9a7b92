"""Test-only fault injection: named points where the recovery tests kill a real tauflow process.

`crash_point(name)` does nothing unless the environment variable TAUFLOW_CRASH_AT equals `name`. Then it kills
its own process with SIGKILL, at once, as the OOM killer or a lost machine would: no exception, no `finally`,
no atexit handler, nothing flushed. A name carries the instance where one point is reached many times
("shard-writing:part-00001.parquet", "unit-start:1"), so a test picks the exact moment. With TAUFLOW_CRASH_ONCE
set to a file path, only the first process to reach the point dies, after creating that file: how a Ray worker
is killed once and its retry lets the job finish. Never set either outside tests.

The points: shard-writing:<shard> (its temp file half-written), shard-renamed:<shard> (in place, its progress
record not yet written), dataset-swapping:<dataset> (between the two renames of replace_dataset),
stage-done:<stage> (sealed, the next stage not begun), checkpoint-saving:<step> (saved under its temporary
name, not yet renamed complete), unit-start:<unit> (a worker starting a unit).
"""

from __future__ import annotations

import os
import signal


def crash_point(name: str) -> None:
    """SIGKILL this process if TAUFLOW_CRASH_AT names this point (and TAUFLOW_CRASH_ONCE's file does not exist)."""
    if os.environ.get("TAUFLOW_CRASH_AT") != name:
        return
    once = os.environ.get("TAUFLOW_CRASH_ONCE")
    if once:
        try:
            open(once, "x").close()
        except FileExistsError:
            return
    os.kill(os.getpid(), signal.SIGKILL)
