"""Score stage: a samples dataset scored by the bank, widened with new rewards, NaN refused, on Ray too."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_manifest
from pipeline.errors import StageError
from pipeline.generate import generated_on, pick_device, run_generate
from pipeline.score import decode_images, run_score
from pipeline.shards import open_dataset
from rewards.bank import RewardBank, resolve_dtype
from tests.conftest import PROMPTS, write_manifest


@pytest.fixture
def scored_manifest(tmp_path, generate_manifest, tiny_rewards):
    """scored_manifest(rewards, **run) -> manifest path with the samples already generated."""
    base = load_manifest(generate_manifest("sd3"))
    run_generate(base)
    gen = base.generate.model_dump(mode="json", exclude_none=True)

    def make(rewards: dict[str, dict], name: str = "m.yaml", **run) -> str:
        data = {"run": {**base.run.model_dump(mode="json", exclude_none=True), **run}, "generate": gen,
                "score": {"rewards": [{"name": n, **spec} for n, spec in rewards.items()], "batch_size": 3}}
        return str(write_manifest(tmp_path / name, data))

    return make


def stage_batches(ds, batch_size: int):
    """The batches the score stage scores: each shard cut into `batch_size` rows."""
    for i in range(len(ds.shard_paths)):
        shard = ds.read_shard(i, ["image", "prompt"])
        for lo in range(0, shard.num_rows, batch_size):
            part = shard.slice(lo, batch_size)
            yield decode_images(part["image"]), part["prompt"].to_pylist()


def test_scores_match_the_bank_and_samples_stay_reachable(scored_manifest, tiny_rewards, tmp_path):
    rewards = {"hps": tiny_rewards["hps"], "bright": {"kind": "tests.plugin_rewards:Brightness"}}
    manifest = load_manifest(scored_manifest(rewards))
    scored = open_dataset(run_score(manifest), kind="scored", verify=True)
    samples = open_dataset(manifest.stage_dir("generate"))
    table = scored.read()
    assert scored.num_rows == samples.num_rows == len(PROMPTS) * 2
    assert table.select(samples.features.keys()).equals(samples.read())  # images, noise, ids: all there
    # the bank on the stage's device, at the dtype the dataset records, over the stage's batches: bitwise equal
    # on CPU; on CUDA one GPU is run-to-run deterministic bar kernel selection, allowed one bf16 step (2^-8)
    device = pick_device(manifest.score.device)
    dtype = scored.stats["score_dtype"]["hps"]
    assert scored.stats["score_dtype"] == {"hps": resolve_dtype("auto", device), "bright": dtype}
    assert generated_on(scored, 1) == pick_device(manifest.generate.device)  # regenerate finds it through inputs
    bank = RewardBank(manifest.score.rewards, device, dtype=dtype)
    direct = bank.score_batches(lambda: stage_batches(samples, manifest.score.batch_size))
    rtol = 0 if device == "cpu" else 2**-8 if dtype != "fp32" else 1e-5
    for name in rewards:
        np.testing.assert_allclose(table[f"score_{name}"].to_numpy(), direct[name], rtol=rtol, atol=rtol * 1e-2)
        assert scored.stats["rewards"][name]["mean"] == pytest.approx(float(direct[name].mean()), rel=1e-5)
    assert set(scored.stats["rewards"][name]) >= {"mean", "std", "p5", "p50", "p95"}


def test_adding_a_reward_scores_only_that_reward(scored_manifest, tiny_rewards, tmp_path):
    log = tmp_path / "bright.log"
    first = {"bright": {"kind": "tests.plugin_rewards:Brightness", "options": {"log": str(log)}}}
    path = run_score(load_manifest(scored_manifest(first)))
    before = open_dataset(path).read(["sample_id", "score_bright"])
    calls = log.read_text()
    widened = load_manifest(scored_manifest({**first, "clip": tiny_rewards["clipscore"]}, name="m2.yaml"))
    scored = open_dataset(run_score(widened), kind="scored", verify=True)
    assert log.read_text() == calls  # Brightness was not run again
    assert scored.read(["sample_id", "score_bright"]).equals(before)
    assert "score_clip" in scored.features and set(scored.stats["rewards"]) == {"bright", "clip"}
    assert not list(path.parent.glob(".scored.old-*")) and not path.with_name("scored.adding").exists()
    changed = {"bright": {"kind": "tests.plugin_rewards:Brightness", "options": {"log": "other.log"}}}
    with pytest.raises(StageError, match=r"rewards \['bright'\] were scored with a different spec"):
        run_score(load_manifest(scored_manifest(changed, name="m3.yaml")))


def test_nan_scores_are_an_error_naming_samples(scored_manifest):
    rewards = {"bright": {"kind": "tests.plugin_rewards:Brightness", "options": {"nan_for": PROMPTS[1]}}}
    manifest = load_manifest(scored_manifest(rewards))
    with pytest.raises(StageError, match=r"reward bright gave NaN/inf for 2 samples of part-00000.parquet: \['[0-9a-f]{16}', '[0-9a-f]{16}'\]"):
        run_score(manifest)
    assert not (manifest.stage_dir("score") / "manifest.json").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_score_on_ray_equals_local(ray_local, scored_manifest, tiny_rewards, tmp_path):
    # the plug-in's module (tests.plugin_rewards) must import inside the Ray workers too
    rewards = {"hps": tiny_rewards["hps"], "ir": tiny_rewards["imagereward"],
               "bright": {"kind": "tests.plugin_rewards:Brightness"}}
    local = run_score(load_manifest(scored_manifest(rewards)))
    on_ray = run_score(load_manifest(scored_manifest(rewards, name="ray.yaml", executor="ray")), overwrite=True)
    assert local == on_ray  # same directory, rewritten by the Ray run
    table = open_dataset(on_ray, verify=True).read(["score_hps", "score_ir", "score_bright"])
    direct = RewardBank(load_manifest(scored_manifest(rewards)).score.rewards)
    samples = open_dataset(on_ray).read(["image", "prompt"])
    want = direct.score_batches(lambda: [(decode_images(samples["image"]), samples["prompt"].to_pylist())])
    assert np.allclose(table["score_hps"].to_numpy(), want["hps"], rtol=1e-5, atol=1e-6)
    assert np.allclose(table["score_ir"].to_numpy(), want["ir"], rtol=1e-5, atol=1e-6)
    assert np.array_equal(table["score_bright"].to_numpy(), want["bright"])
