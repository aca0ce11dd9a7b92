"""Nothing stale, nothing half-written: a real `tauflow` process killed (SIGKILL, through pipeline.faults) at a
named crash point, then the same command rerun to completion, ends byte-identical to an uninterrupted run of it.

Every run lives in its own directory with a cwd-relative output_dir, so two runs' records name the same paths and
can be compared whole. What must be equal: every file's bytes (shards, weights, checkpoints, progress records),
except the records that hold a time: manifest.json (created_at) and log.jsonl (samples_per_s). Those are equal
field by field without the time, and so is a checkpoint's random_states_0.pkl without the states of Python's and
NumPy's generators, which no run seeds or draws from (they differ between two uninterrupted runs too). Where a
rerun regenerated an upstream dataset, the downstream records also name that dataset's manifest.json by its
sha256, which holds its time; those hashes and the identity derived from them (config_hash) are then left out too.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.shards import open_dataset

pytestmark = pytest.mark.slow
PROMPTS = "a red cat\na blue dog\nthe photo of a digit\na handwritten seven\nan orange fox\n"
REPO = Path(__file__).resolve().parents[1]
TIMED = {"manifest.json", "log.jsonl"}  # records holding a time: compared field by field without it
RNG = "random_states_0.pkl"  # a checkpoint's generator states (see the docstring)
TRAIN = {"method": "tgo", "batch_size": 4, "learning_rate": 1e-3, "max_steps": 3, "checkpoint_every": 1,
         "checkpoint_limit": 2}
IDENTITY = {"done.json", "plan.json"}  # records naming the stage's identity: compared without it after an upstream rerun


@pytest.fixture(scope="module")
def write_run(tiny_model, tmp_path_factory):
    """write_run(directory, **sections) -> the run directory with m.yaml: generate (3 shards), score and
    threshold; `sections` adds or replaces sections (TRAIN)."""
    shared = tmp_path_factory.mktemp("shared")
    (shared / "prompts.txt").write_text(PROMPTS)
    base = {
        "run": {"name": "f", "output_dir": "out", "seed": 0, "executor": "local"},
        "generate": {"model": str(tiny_model("sd3")), "prompts": str(shared / "prompts.txt"), "images_per_prompt": 2,
                     "num_inference_steps": 2, "height": 16, "width": 16, "batch_size": 4, "prompts_per_shard": 2,
                     "guidance_scale": 2.0},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}], "batch_size": 2},
        "threshold": {"reward": "bright"},
    }

    def write(directory: Path, **sections: dict | None) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "m.yaml").write_text(yaml.safe_dump({**base, **sections}, sort_keys=False))
        return directory

    return write


def tauflow(run_dir: Path, *args: str, crash: str | None = None) -> str:
    """`tauflow <args>` in `run_dir`, in its own session; with `crash`, it must die there (SIGKILL), and the rest
    of its process group is killed with it. Returns its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAUFLOW_CRASH")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])  # this checkout, tests.*
    if crash:
        env["TAUFLOW_CRASH_AT"] = crash
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=run_dir, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    expected = -signal.SIGKILL if crash else 0
    assert proc.returncode == expected, f"tauflow {' '.join(args)} exited {proc.returncode}:\n{output}"
    return output


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under `root` (TensorBoard's event files, named by host and time,
    and the per-process attempt counters, left out)."""
    files = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_file() and "tensorboard/" not in rel and "/attempts-" not in rel:
            files[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return files


def _record(path: Path, upstream_rerun: bool) -> object:
    if path.name == RNG:
        state = torch.load(path, weights_only=False)
        unseeded = ("random_state", "numpy_random_seed")
        return {k: v.tolist() if torch.is_tensor(v) else v for k, v in state.items() if k not in unseeded}
    if path.name == "log.jsonl":
        lines = path.read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"} for line in lines]
    record = json.loads(path.read_text())
    record.pop("created_at", None)
    if upstream_rerun:
        record.pop("config_hash", None)
        for item in record.get("inputs", []):
            item.pop("manifest_sha256")
    return record


def assert_same(got: Path, want: Path, *, upstream_rerun: bool = False) -> None:
    """The same files under both, byte-identical but for the records compared field by field (see the docstring)."""
    a, b = tree(got), tree(want)
    assert sorted(a) == sorted(b), f"only in {got}: {sorted(set(a) - set(b))}; only in {want}: {sorted(set(b) - set(a))}"
    differing = [p for p in a if a[p] != b[p]]
    records = TIMED | {RNG} | (IDENTITY if upstream_rerun else set())
    assert all(Path(p).name in records for p in differing), f"bytes differ: {differing}"
    for p in differing:
        assert _record(got / p, upstream_rerun) == _record(want / p, upstream_rerun), p
    for dataset in {p.parent for p in map(Path, a) if p.name == "manifest.json"}:
        open_dataset(got / dataset, verify=True)  # and the result verifies


def copy_run(src: Path, dst: Path, *keep: str) -> Path:
    """A new run directory holding `src`'s m.yaml and the outputs named in `keep` (byte for byte)."""
    dst.mkdir()
    shutil.copy(src / "m.yaml", dst / "m.yaml")
    for name in keep:
        shutil.copytree(src / "out" / name, dst / "out" / name)
    return dst


@pytest.fixture(scope="module")
def clean(write_run, tmp_path_factory) -> Path:
    """The uninterrupted run every crashed one is compared with."""
    run_dir = write_run(tmp_path_factory.mktemp("clean"))
    tauflow(run_dir, "run", "m.yaml")
    return run_dir


def test_generate_killed_mid_shard_reruns_to_the_clean_samples(clean, write_run, tmp_path):
    run_dir = write_run(tmp_path / "r")
    tauflow(run_dir, "generate", "m.yaml", crash="shard-writing:part-00001.parquet")
    out = run_dir / "out" / "samples"
    assert (out / "part-00000.parquet").exists() and list(out.glob(".part-00001.parquet.tmp-*"))  # killed mid-shard
    tauflow(run_dir, "generate", "m.yaml")
    assert_same(out, clean / "out" / "samples")


def test_a_finished_shard_changed_before_the_rerun_is_redone(clean, write_run, tmp_path):
    """Resume trusts a finished shard only by its recorded sha256: a flipped byte (same size) is written again."""
    run_dir = write_run(tmp_path / "r")
    tauflow(run_dir, "generate", "m.yaml", crash="shard-writing:part-00002.parquet")
    shard = run_dir / "out" / "samples" / "part-00000.parquet"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    tauflow(run_dir, "generate", "m.yaml")
    assert_same(run_dir / "out" / "samples", clean / "out" / "samples")


def test_score_killed_between_a_shards_rename_and_its_record_reruns_to_the_clean_scores(clean, tmp_path):
    run_dir = copy_run(clean, tmp_path / "r", "samples")
    tauflow(run_dir, "score", "m.yaml", crash="shard-renamed:part-00001.parquet")
    out = run_dir / "out" / "scored"
    assert (out / "part-00001.parquet").exists() and not (out / ".progress" / "part-00001.parquet.json").exists()
    tauflow(run_dir, "score", "m.yaml")
    assert_same(out, clean / "out" / "scored")


@pytest.fixture(scope="module")
def clean_train(clean, write_run, tmp_path_factory) -> Path:
    """An uninterrupted `tauflow train` on the clean run's data."""
    run_dir = write_run(copy_run(clean, tmp_path_factory.mktemp("train") / "r", "samples", "scored", "labeled"), train=TRAIN)
    tauflow(run_dir, "train", "m.yaml")
    return run_dir


def test_train_killed_mid_checkpoint_resumes_to_the_clean_weights(clean, clean_train, write_run, tmp_path):
    run_dir = write_run(copy_run(clean, tmp_path / "r", "samples", "scored", "labeled"), train=TRAIN)
    tauflow(run_dir, "train", "m.yaml", crash="checkpoint-saving:2")
    out = run_dir / "out" / "train" / "tgo"
    assert (out / "checkpoints" / ".checkpoint-2.partial" / "trainer_state.json").exists()
    tauflow(run_dir, "train", "m.yaml", "--resume", "latest")
    assert_same(out, clean_train / "out" / "train" / "tgo")  # the final weights, checkpoints and losses included


def test_score_killed_mid_swap_reruns_to_the_clean_widened_dataset(clean, write_run, tmp_path):
    """Adding a reward builds scored.adding, then swaps it in with two renames; the kill falls between them."""
    rewards = {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"},
                           {"name": "glow", "kind": "tests.plugin_rewards:Brightness"}], "batch_size": 2}
    widened = {}
    for name, crash in (("uninterrupted", None), ("crashed", "dataset-swapping:scored")):
        run_dir = write_run(copy_run(clean, tmp_path / name, "samples", "scored"), score=rewards)
        tauflow(run_dir, "score", "m.yaml", crash=crash)
        widened[name] = run_dir / "out"
    out = widened["crashed"]
    assert not (out / "scored").exists() and (out / ".scored.old").exists() and (out / "scored.adding").exists()
    tauflow(out.parent, "score", "m.yaml")
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in widened["uninterrupted"].iterdir())
    assert_same(out / "scored", widened["uninterrupted"] / "scored")
    assert "score_glow" in open_dataset(out / "scored").features


def test_run_killed_between_stages_skips_the_finished_one(clean, write_run, tmp_path):
    run_dir = write_run(tmp_path / "r")
    tauflow(run_dir, "run", "m.yaml", crash="stage-done:generate")
    samples = run_dir / "out" / "samples" / "manifest.json"
    sealed = samples.read_bytes()
    assert not (run_dir / "out" / "scored").exists()
    output = tauflow(run_dir, "run", "m.yaml")
    assert "generate: out/samples is complete; skipping" in output and samples.read_bytes() == sealed
    assert_same(run_dir / "out" / "samples", clean / "out" / "samples")
    assert_same(run_dir / "out", clean / "out", upstream_rerun=True)
