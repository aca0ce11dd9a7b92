"""Rounds (run.rounds): each round generates from, and trains on, the model the round before trained; a run
killed mid-round resumes that round and ends with the datasets of an uninterrupted run; eval compares every
round's model with the base."""

from __future__ import annotations

import contextlib
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from tests.conftest import write_manifest
from tests.train_harness import PROMPTS

from pipeline.cli import main
from pipeline.config import load_manifest
from pipeline.errors import ManifestError
from pipeline.seeds import round_seed
from pipeline.stage import rounds

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ("samples", "scored", "labeled", "pairs")


def manifest(root: Path, model: Path, **train) -> Path:
    """A 2-round run of the tiny SD3 pipeline in `root`, paths relative to it (so two roots write equal bytes)."""
    (root / "prompts.txt").write_text(PROMPTS)
    (root / "eval.txt").write_text("a red cat\nan orange fox\n")
    data = {
        "run": {"name": "r", "output_dir": "out", "executor": "local", "rounds": 2, "prompts_per_round": 4},
        "generate": {"model": str(model), "prompts": "prompts.txt", "images_per_prompt": 4, "num_inference_steps": 2,
                     "height": 16, "width": 16, "batch_size": 8, "guidance_scale": 2.0, "prompts_per_shard": 1},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}]},
        "threshold": {"reward": "bright", "tau_from": "round0"},
        "pair": {"reward": "bright"},
        "train": {"method": "tgo", "batch_size": 4, "learning_rate": 1e-3, "max_steps": 2, **train},
    }
    return write_manifest(root / "m.yaml", data)


def tauflow(root: Path, *args: str, wait: bool = True) -> subprocess.Popen | subprocess.CompletedProcess:
    """`tauflow` in its own process and session, run from `root` (every run trains with the same threads)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pipeline.cli", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=root, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)


def stage_lines(printed: str) -> list[str]:
    """The `<stage>: <output>` lines `tauflow run` prints (progress bars aside)."""
    return [line for line in printed.splitlines() if re.fullmatch(r"\w+: out/\S*", line)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_model) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("rounds")
    manifest(root, tiny_model("sd3"))
    done = tauflow(root, "run", "m.yaml")
    assert done.returncode == 0, done.stderr
    return root / "out", done.stdout


@pytest.mark.slow
def test_two_rounds_run_each_from_the_model_before(uninterrupted):
    out, printed = uninterrupted
    stages = ("generate", "score", "threshold", "pair", "train")
    folders = ("samples", "scored", "labeled", "pairs", "train/tgo")
    expected = [f"{s}: out/{f}" for s, f in zip(stages, folders)] + [f"{s}: out/round-1/{f}" for s, f in zip(stages, folders)]
    assert stage_lines(printed) == expected
    assert not (out / "round-0").exists()  # round 0 is where a one-round run writes
    samples = json.loads((out / "round-1/samples/manifest.json").read_text())
    assert samples["config"]["generate"]["model"] == "out/train/tgo"  # the parent round's model
    assert samples["config"]["run"]["seed"] == round_seed(0, 1)
    assert samples["stats"]["prompts"]["drawn"] == 4 and samples["num_rows"] == 16
    for folder, seed in (("samples", 0), ("round-1/samples", round_seed(0, 1))):  # each round draws with its seed
        drawn = sorted(np.random.default_rng(seed).choice(5, 4, replace=False).tolist())
        texts = [t for part in sorted((out / folder).glob("part-*.parquet")) for t in pq.read_table(part)["prompt"].to_pylist()]
        assert list(dict.fromkeys(texts)) == [PROMPTS.splitlines()[i] for i in drawn]
    # tau_from: round0 -> round 1 labels with round 0's tau, and its record names that dataset
    taus = [json.loads((out / d / "labeled/thresholds.json").read_text())["tau_global"] for d in ("", "round-1")]
    assert taus[0] == taus[1]
    labeled = json.loads((out / "round-1/labeled/manifest.json").read_text())
    assert [i["path"] for i in labeled["inputs"]] == ["out/round-1/scored", "out/labeled"]
    done = json.loads((out / "round-1/train/tgo/done.json").read_text())
    assert done["base"] == done["reference"] == "out/train/tgo"
    # reference: previous -> at round 1's first step the reference is the policy
    first = json.loads((out / "round-1/train/tgo/log.jsonl").read_text().splitlines()[0])
    assert first["policy_error"] == first["reference_error"]


@pytest.mark.slow
def test_round_one_samples_regenerate_from_round_zero_model(uninterrupted, tiny_model):
    from pipeline.config import GenerateSection
    from pipeline.generate import SampleGenerator, regenerate
    from pipeline.prompts import Prompt
    from pipeline.schema import noise_from_arrow
    from pipeline.shards import open_dataset

    out, _ = uninterrupted
    row = open_dataset(out / "round-1/samples").read_shard(0).slice(0, 1)
    with contextlib.chdir(out.parent):
        stored, fresh = regenerate(out / "round-1/samples", row["sample_id"][0].as_py())
        assert np.array_equal(stored, fresh)
        # ... and the base model makes another image from the same noise: the round trained a different model
        cfg = json.loads((out / "round-1/samples/manifest.json").read_text())["config"]["generate"]
        base = SampleGenerator(GenerateSection.model_validate({**cfg, "model": str(tiny_model("sd3"))}), run_seed=0)
        noise = torch.from_numpy(noise_from_arrow(row["noise"], base.family.noise_shape).copy())
        prompt = Prompt(row["prompt_id"][0].as_py(), row["prompt"][0].as_py(), None)
        latents: list = []
        base.images([prompt], [row["seed"][0].as_py()], noise, latents)
    stored_latent = noise_from_arrow(row["latent"], base.family.noise_shape)
    assert not np.array_equal(latents[0].to(torch.float16).numpy(), stored_latent)


@pytest.mark.slow
def test_a_run_killed_mid_round_resumes_it_with_the_same_datasets(uninterrupted, tmp_path, tiny_model):
    out, _ = uninterrupted
    manifest(tmp_path, tiny_model("sd3"))
    run = tauflow(tmp_path, "run", "m.yaml", wait=False)
    first_shard = tmp_path / "out/round-1/samples/part-00000.parquet"
    deadline = time.monotonic() + 600
    while not first_shard.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert first_shard.exists() and not (tmp_path / "out/round-1/samples/manifest.json").exists()  # killed mid-round
    again = tauflow(tmp_path, "run", "m.yaml")
    assert again.returncode == 0, again.stderr
    assert stage_lines(again.stdout)[:5] == [f"{s}: out/{f}" for s, f in zip(("generate", "score", "threshold", "pair", "train"),
                                                                           ("samples", "scored", "labeled", "pairs", "train/tgo"))]
    for folder in [*DATASETS, *(f"round-1/{d}" for d in DATASETS)]:
        parts = sorted((out / folder).glob("part-*.parquet"))
        assert parts and [p.name for p in parts] == [p.name for p in sorted((tmp_path / "out" / folder).glob("part-*.parquet"))]
        for part in parts:
            assert part.read_bytes() == (tmp_path / "out" / folder / part.name).read_bytes(), f"{folder}/{part.name}"


@pytest.mark.slow
def test_lora_rounds_keep_the_base_as_reference_and_eval_compares_every_round(tmp_path, tiny_model):
    base = str(tiny_model("sd3"))
    path = manifest(tmp_path, tiny_model("sd3"), method="dpo", reference="base", lora={"rank": 4})
    with contextlib.chdir(tmp_path):
        data = load_manifest(path).model_dump(mode="json", exclude_none=True)
        data["eval"] = {"prompts": "eval.txt", "images_per_prompt": 1, "bootstrap": 20, "grid_prompts": 1}
        write_manifest(path, data)
        assert main(["run", "m.yaml"]) == 0
    out = tmp_path / "out"
    done = json.loads((out / "round-1/train/dpo/done.json").read_text())
    assert done["format"] == "lora" and done["base"] == "out/train/dpo" and done["reference"] == base
    logs = [json.loads((out / d / "train/dpo/log.jsonl").read_text().splitlines()[0]) for d in ("", "round-1")]
    assert logs[0]["policy_error"] == logs[0]["reference_error"]  # round 0: the base is the model it starts from
    assert logs[1]["policy_error"] != logs[1]["reference_error"]  # round 1 starts from round 0's model, not the base
    results = json.loads((out / "eval/results.json").read_text())
    assert [m["name"] for m in results["models"]] == ["base", "dpo/round-0", "dpo/round-1"]
    assert results["models"][2]["drift"] > 0


def test_round_options_are_checked_up_front(tmp_path, tiny_model, capsys, monkeypatch):
    path = manifest(tmp_path, tiny_model("sd3"))
    monkeypatch.chdir(tmp_path)
    m = load_manifest(path, ["run.rounds=3"])
    assert m.run.rounds == 3
    first = next(rounds(m))
    assert first.run.rounds == 1 and first.output_dir == m.output_dir and first.eval is None
    assert next(rounds(load_manifest(path, ["run.rounds=1"]))) == load_manifest(path, ["run.rounds=1"])
    bad = {
        "train.methods=[tgo,dpo]": "train one model per round: give train.method, not train.methods",
        "train.data=m.yaml": "train.data must not be set",
        "threshold.mode=per_prompt": "threshold.tau_from: round0 fixes one global tau for every round; mode is 'per_prompt' (got 'round0')",
        "run.rounds=0": "run.rounds: Input should be greater than or equal to 1",
    }
    for override, message in bad.items():
        extra = ["train.method=null"] if "methods" in override else []
        with pytest.raises(ManifestError, match=re.escape(message)):
            load_manifest(path, [override, *extra])
    assert main(["run", str(path), "--rounds", "0"]) == 2
    assert "run.rounds: Input should be greater than or equal to 1" in capsys.readouterr().err
