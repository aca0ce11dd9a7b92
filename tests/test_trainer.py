"""Trainer on a tiny SD3 pipeline: closed forms at init, one step in the right direction, recorded noise,
exact resume, step logs (JSONL and TensorBoard), two processes == one, the refusal of noise-free pairs for PNAPO, and
images read only where no latents are recorded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from pipeline.config import load_manifest
from pipeline.errors import ManifestError, StageError
from pipeline.pair import run_pair
from pipeline.shards import open_dataset
from tests.conftest import write_manifest
from tests.train_harness import make_step, one_sgd_step, prepare_run
from trainer.methods import METHODS
from trainer.recipe import as_floats, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    """A tiny SD3 run with samples, scores, labels and pairs; returns a manifest factory for the train section."""
    return prepare_run(tmp_path_factory.mktemp("train-run"), tiny_model("sd3"))


@pytest.mark.parametrize(("method", "closed_form"), [("tgo", None), ("dpo", math.log(2)), ("pnapo", math.log(2)), ("kto", 0.5)])
def test_losses_at_init_have_closed_form_and_gradient(run_dir, method, closed_form):
    step, batch = make_step(run_dir(method=method))
    loss, _ = step(batch, 0, 0.0)
    if method == "tgo":
        closed_form = batch["weight"].mean().item() * math.log(2)
    assert loss.item() == pytest.approx(closed_form, rel=1e-5)
    loss.backward()
    grads = [p.grad for p in step.policy.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in step.reference.parameters())


@pytest.mark.parametrize("label", [1, 0])
def test_one_tgo_step_raises_log_pi_of_positives_and_lowers_negatives(run_dir, label):
    step, batch = make_step(run_dir(method="tgo", batch_size=12))
    keep = [i for i, l in enumerate(batch["label"].tolist()) if l == label]
    assert keep
    only = {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in batch.items()}
    m = one_sgd_step(step, only)
    assert (m["score_pos"].item() > 0) if label == 1 else (m["score_neg"].item() < 0)


@pytest.mark.parametrize("method", ["dpo", "pnapo"])
def test_one_pair_step_favours_winners_over_losers(run_dir, method):
    step, batch = make_step(run_dir(method=method))
    m = one_sgd_step(step, batch)
    assert m["score_winner"] - m["score_loser"] > 0  # log pi/pi_ref of winners rises relative to losers


def test_pnapo_uses_recorded_noise_and_dpo_does_not(run_dir):
    pnapo, batch = make_step(run_dir(method="pnapo"))
    dpo, _ = make_step(run_dir(method="dpo"))
    for step in (pnapo, dpo):  # move the policy off the reference so the losses depend on the inputs
        with torch.no_grad():
            for p in step.policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
    changed = {**batch, "winner_noise": batch["winner_noise"] + 1.0}
    with torch.no_grad():
        assert pnapo(batch, 0, 0.5)[0].item() != pytest.approx(pnapo(changed, 0, 0.5)[0].item(), rel=1e-6)
        assert dpo(batch, 0, 0.5)[0].item() == dpo(changed, 0, 0.5)[0].item()


@pytest.mark.parametrize("method", list(METHODS))
def test_metrics_stay_on_the_device_until_a_logged_step_reads_them(run_dir, method):
    step, batch = make_step(run_dir(method=method))
    _, metrics = step(batch, 0, 0.0)
    assert not any(isinstance(v, float) for k, v in metrics.items() if k != "beta_t")  # nothing read yet
    floats = as_floats(metrics)
    assert list(floats) == list(metrics) and all(type(v) is float for v in floats.values())
    read_one_by_one = {k: v if isinstance(v, float) else v.item() for k, v in metrics.items()}
    assert json.dumps(floats) == json.dumps(read_one_by_one)  # the same floats (nan included) as `.item()` gives


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]


def test_resume_gives_the_same_losses(run_dir, tmp_path):
    full = train(run_dir("full.yaml", method="dpo", max_steps=4, output_dir=str(tmp_path / "a")))
    part = run_dir("part.yaml", method="dpo", max_steps=2, checkpoint_every=2, output_dir=str(tmp_path / "b"))
    train(part)
    resumed = train(run_dir("resume.yaml", method="dpo", max_steps=4, output_dir=str(tmp_path / "b")), resume="latest")
    assert len(_losses(resumed)) == 4
    assert _losses(resumed) == pytest.approx(_losses(full), rel=1e-5)
    with pytest.raises(StageError, match="holds checkpoints of an earlier run; use --resume latest or --overwrite"):
        (resumed / "done.json").unlink()
        train(run_dir("again.yaml", method="dpo", max_steps=4, output_dir=str(tmp_path / "b")))


def test_every_step_is_logged_to_jsonl_and_tensorboard(run_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = train(run_dir("tb.yaml", method="tgo", max_steps=3, output_dir=str(tmp_path / "tb")))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    wanted = {"loss", "implicit_acc", "score_pos", "score_neg", "beta_t", "policy_error", "reference_error", "grad_norm",
              "lr", "samples_per_s"}
    assert [r["step"] for r in records] == [1, 2, 3] and all(wanted <= set(r) for r in records)
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records]


def _external_pairs(tmp_path):
    """Pick-a-Pic-like pairs of PNG images, without prior noise or latents."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buf, format="PNG")
    rows = [{"jpg_0": buf.getvalue(), "jpg_1": buf.getvalue(), "label_0": 1.0, "caption": f"p{i}"} for i in range(4)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "ext.parquet")
    ext = load_manifest(write_manifest(tmp_path / "ext.yaml", {"run": {"name": "e", "output_dir": str(tmp_path / "ext")},
                                                               "pair": {"external": {"path": str(tmp_path / "ext.parquet")}}}))
    return run_pair(ext)


def test_pnapo_refuses_pairs_without_noise(run_dir, tmp_path):
    pairs = _external_pairs(tmp_path)
    with pytest.raises(StageError, match="PNAPO needs both samples' recorded prior noise and these pairs have none"):
        train(run_dir("ext-train.yaml", method="pnapo", data=str(pairs), output_dir=str(tmp_path / "x")))


@pytest.mark.parametrize("method", list(METHODS))
def test_images_are_not_read_where_latents_are_recorded(run_dir, method):
    step, batch = make_step(run_dir(method=method))
    samples = step.method.samples
    assert {s.latent for s in samples} <= set(batch) and not {s.image for s in samples} & set(batch)
    assert ({s.noise for s in samples} <= set(batch)) == (method == "pnapo")


def test_images_are_decoded_and_encoded_where_no_latents_are_recorded(run_dir, tmp_path):
    pairs = _external_pairs(tmp_path)
    assert {"winner_image", "loser_image"} <= set(METHODS["dpo"].columns(set(open_dataset(pairs).features)))
    out = train(run_dir("ext-dpo.yaml", method="dpo", data=str(pairs), max_steps=1, output_dir=str(tmp_path / "d")))
    assert math.isfinite(_losses(out)[0])


@pytest.mark.slow
def test_two_processes_match_one(run_dir, tmp_path):
    one = train(run_dir("one.yaml", method="pnapo", max_steps=3, output_dir=str(tmp_path / "one")))
    two_manifest = run_dir("two.yaml", method="pnapo", max_steps=3, output_dir=str(tmp_path / "two"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m", "trainer",
           two_manifest.source]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    assert _losses(tmp_path / "two" / "train" / "pnapo") == pytest.approx(_losses(one), rel=1e-4, abs=1e-6)



def test_pnapo_fresh_noise_ignores_the_recorded_noise_and_noises_each_sample_on_its_own(run_dir):
    """train.noise: fresh is the paper's falsification test: the same loss, each sample with its own fresh noise."""
    fresh, batch = make_step(run_dir(method="pnapo", noise="fresh"))
    with torch.no_grad():
        for p in fresh.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    changed = {**batch, "winner_noise": batch["winner_noise"] + 1.0}
    with torch.no_grad():
        assert fresh(batch, 0, 0.5)[0].item() == fresh(changed, 0, 0.5)[0].item()
    n = len(batch["prompt"])
    noise, t = fresh._randomness(0, n, (2, 3, 3), per_row=2)
    shared, t_shared = fresh._randomness(0, n, (2, 3, 3))
    assert noise.shape == (2 * n, 2, 3, 3) and not torch.equal(noise[:n], noise[n:])  # winner and loser differ
    assert torch.equal(t, t_shared)  # the same t draws as with shared noise


def test_pnapo_noise_is_a_typed_option(run_dir):
    with pytest.raises(ManifestError, match="noise"):
        run_dir("bad-noise.yaml", method="pnapo", noise="shared")
    with pytest.raises(ManifestError, match="noise"):
        run_dir("foreign-noise.yaml", method="dpo", noise="fresh")
