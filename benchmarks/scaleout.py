"""The generate stage on a 2-node Ray cluster simulated on this machine writes the same dataset as one node."""

from __future__ import annotations

import time
from pathlib import Path


def bench_scaleout(tmp: Path) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    from benchmarks.stages import _generate_manifest
    from pipeline.config import load_manifest
    from pipeline.generate import run_generate
    from pipeline.shards import open_dataset

    local = load_manifest(_generate_manifest(tmp, steps=4, size=32, batch=4, prompts=8, executor="local"))
    one = [s["sha256"] for s in open_dataset(run_generate(local)).manifest["shards"]]
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address)
        start = time.perf_counter()
        two = load_manifest(_generate_manifest(tmp, steps=4, size=32, batch=4, prompts=8, executor="ray"))
        path = run_generate(two)
        seconds = time.perf_counter() - start
        nodes = len([n for n in ray.nodes() if n["Alive"]])
    finally:
        ray.shutdown()
        cluster.shutdown()
    shards = [s["sha256"] for s in open_dataset(path, verify=True).manifest["shards"]]
    return {"nodes": nodes, "shards": len(shards), "identical_to_one_node": shards == one, "seconds_with_startup": seconds}
