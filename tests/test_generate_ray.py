"""Generate on a local Ray instance: same dataset as in-process, and after a worker or the driver is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline.config import load_manifest
from pipeline.errors import StageError
from pipeline.generate import run_generate
from pipeline.shards import StageOutput, open_dataset

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _plan_hash(path) -> str:
    return json.loads((path / ".progress" / "plan.json").read_text())["config_hash"]


def shard_hashes(path) -> list[str]:
    return [s["sha256"] for s in open_dataset(path, verify=True).manifest["shards"]]


@pytest.fixture
def clean_hashes(generate_manifest, tmp_path):
    path = run_generate(load_manifest(generate_manifest("sd3", run={"output_dir": str(tmp_path / "clean")})))
    return shard_hashes(path)


def test_ray_worker_killed_mid_run_ends_with_the_clean_dataset(ray_local, generate_manifest, clean_hashes, tmp_path, monkeypatch):
    marker = tmp_path / "crashed"
    monkeypatch.setenv("TAUFLOW_CRASH_AT", "unit-start:1")
    monkeypatch.setenv("TAUFLOW_CRASH_ONCE", str(marker))
    manifest = load_manifest(generate_manifest("sd3", run={"executor": "ray"}, num_workers=2))
    path = run_generate(manifest)
    assert marker.exists()  # the worker really died on unit 1 and the unit was retried
    assert shard_hashes(path) == clean_hashes


def test_driver_killed_then_rerun_ends_with_the_clean_dataset(ray_local, generate_manifest, tmp_path):
    slower = {"images_per_prompt": 8, "num_inference_steps": 8}  # so the kill lands between shards
    clean = generate_manifest("sd3", run={"output_dir": str(tmp_path / "clean")}, **slower)
    clean_hashes = shard_hashes(run_generate(load_manifest(clean)))
    manifest_path = generate_manifest("sd3", run={"executor": "ray"}, **slower)
    out = load_manifest(manifest_path).stage_dir("generate")
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    cli = [sys.executable, "-m", "pipeline.cli", "generate", str(manifest_path)]
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while not list((out / ".progress").glob("part-*.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists()
    manifest = load_manifest(manifest_path)
    partial = StageOutput(out, kind="samples", stage="generate", config_hash=_plan_hash(out))
    assert 0 < len(partial.completed()) < 3  # killed mid-run: some shards written, some not
    run_generate(manifest)
    assert shard_hashes(out) == clean_hashes


def test_unit_whose_worker_keeps_dying_fails_the_job_and_keeps_finished_shards(
    ray_local, generate_manifest, monkeypatch
):
    monkeypatch.setenv("TAUFLOW_CRASH_AT", "unit-start:1")
    manifest = load_manifest(generate_manifest("sd3", run={"executor": "ray"}, max_retries=1))
    with pytest.raises(StageError, match="unit 1: its worker died 2 times; giving up"):
        run_generate(manifest)
    out = manifest.stage_dir("generate")
    assert (out / "part-00000.parquet").is_file() and not (out / "manifest.json").exists()


def test_unit_that_keeps_failing_fails_the_job_and_keeps_finished_shards(generate_manifest):
    manifest = load_manifest(generate_manifest("sd3", max_retries=1))
    path = run_generate(manifest)
    (path / "manifest.json").unlink()
    (path / "part-00001.parquet").unlink()
    (path / ".progress" / "part-00001.parquet.json").unlink()
    (path / "part-00001.parquet").mkdir()  # unit 1 can never be written
    with pytest.raises(StageError, match=r"unit 1 failed after 2 attempts: IsADirectoryError"):
        run_generate(manifest)
    assert (path / "part-00000.parquet").is_file() and (path / "part-00002.parquet").is_file()
