"""`python -m benchmarks [--only NAME ...] [--quick]`: run, print a markdown table, write benchmarks/results.json."""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.gpu_data import bench_gpu_data  # noqa: E402
from benchmarks.gpu_train import bench_gpu_train  # noqa: E402
from benchmarks.scaleout import bench_scaleout  # noqa: E402
from benchmarks.stages import bench_generate, bench_io, bench_pair, bench_score, bench_threshold  # noqa: E402
from benchmarks.training import bench_train  # noqa: E402

BENCHES = {"generate": bench_generate, "score": bench_score, "threshold": bench_threshold, "pair": bench_pair,
           "io": bench_io, "train": bench_train, "scaleout": bench_scaleout,
           # real-size models on CUDA; skipped with the reason without it
           "gpu_data": bench_gpu_data, "gpu_train": bench_gpu_train}


def flatten(prefix: str, value) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        if set(value) == {"median", "min", "max"}:
            return [(prefix, f"{value['median']:.3f} (min {value['min']:.3f}, max {value['max']:.3f})")]
        return [row for k, v in value.items() for row in flatten(f"{prefix}.{k}" if prefix else k, v)]
    if isinstance(value, float):
        return [(prefix, f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}")]
    return [(prefix, str(value))]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHES), help="run only these")
    parser.add_argument("--quick", action="store_true", help="threshold at 10 M rows only")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args()
    import torch

    out = Path(args.out)
    # --only refreshes those benchmarks and keeps the others' figures
    results = json.loads(out.read_text()) if args.only and out.exists() else {}
    results |= {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
                "date": time.strftime("%Y-%m-%d %H:%M")}
    for name in args.only or BENCHES:
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
            fn = BENCHES[name]
            start = time.perf_counter()
            results[name] = fn(Path(tmp), (10_000_000,)) if name == "threshold" and args.quick else fn(Path(tmp))
            results[name]["bench_seconds"] = time.perf_counter() - start
            print(f"{name}: done in {results[name]['bench_seconds']:.0f} s", flush=True)
    out.write_text(json.dumps(results, indent=2))
    print("\n| benchmark | figure | value |\n|---|---|---|")
    for name in BENCHES:
        for key, value in flatten("", results.get(name, {})):
            print(f"| {name} | {key} | {value} |")


if __name__ == "__main__":
    main()
