"""Timing helpers: medians of repeats with min/max, peak RSS of a child process."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(fn: Callable[[], object], repeats: int = 3) -> dict[str, float]:
    """Seconds per call: median, min, max over `repeats` calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median": statistics.median(times), "min": min(times), "max": max(times)}


def timed_pair(stage: Callable[[], object], bare: Callable[[], object], repeats: int = 5) -> tuple[dict, dict]:
    """`timed` for a stage and its bare baseline, alternating runs so that machine drift hits both alike."""
    runs = [(timed(stage, 1)["median"], timed(bare, 1)["median"]) for _ in range(repeats)]

    def summary(times: list[float]) -> dict[str, float]:
        return {"median": statistics.median(times), "min": min(times), "max": max(times)}

    return summary([s for s, _ in runs]), summary([b for _, b in runs])


def ratio(stage: dict[str, float], bare: dict[str, float]) -> dict[str, float]:
    """stage time / bare time (1.0 = no overhead), with the extremes."""
    return {"median": stage["median"] / bare["median"], "min": stage["min"] / bare["max"], "max": stage["max"] / bare["min"]}


def child(code: str) -> dict:
    """Run `code` in a fresh interpreter; it prints one JSON line, to which peak RSS (MiB) is added."""
    wrapped = code + "\nimport resource, json as _j\nprint('RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    out = subprocess.run([sys.executable, "-c", wrapped], capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = out.strip().splitlines()
    result = json.loads(next(line for line in lines if line.startswith("{")))
    result["peak_rss_mib"] = float(next(line for line in lines if line.startswith("RSS")).split()[1])
    return result
