"""Trainer on a tiny SD3 pipeline: closed forms at init, one step in the right direction, recorded noise,
exact resume, LoRA round trip, two processes == one, and the refusal of noise-free pairs for PNAPO."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import write_manifest

from pipeline.config import load_manifest
from pipeline.errors import StageError
from pipeline.generate import run_generate
from pipeline.pair import run_pair
from pipeline.score import run_score
from pipeline.threshold import run_threshold
from trainer.data import GlobalBatches
from trainer.recipe import DynamicBeta, Step, data_columns, load_generator, train


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    """A tiny run with samples, scores, labels and pairs; returns a manifest factory for the train section."""
    root = tmp_path_factory.mktemp("train-run")
    (root / "prompts.txt").write_text("a red cat\na blue dog\nthe photo of a digit\na handwritten seven\nan orange fox\n")
    base = {
        "run": {"name": "t", "output_dir": str(root / "out"), "executor": "local"},
        "generate": {"model": str(tiny_model("sd3")), "prompts": str(root / "prompts.txt"), "images_per_prompt": 4,
                     "num_inference_steps": 2, "height": 16, "width": 16, "batch_size": 8, "guidance_scale": 2.0},
        "score": {"rewards": [{"name": "bright", "kind": "plugin_rewards:Brightness"}]},
        "threshold": {"reward": "bright"},
        "pair": {"reward": "bright"},
    }
    m = load_manifest(write_manifest(root / "base.yaml", base))
    for stage in (run_generate, run_score, run_threshold, run_pair):
        stage(m)

    def make(name: str = "m.yaml", **train) -> object:
        data = {**base, "train": {"batch_size": 4, "learning_rate": 1e-3, "max_steps": 2, **train}}
        if "output_dir" in train:  # a separate training output, reading this run's data
            data["run"] = {**base["run"], "output_dir": train.pop("output_dir")}
            data["train"].pop("output_dir")
            folder = "pairs" if train["method"] in ("pnapo", "dpo") else "labeled"
            data["train"].setdefault("data", str(root / "out" / folder))
        return load_manifest(write_manifest(root / name, data))

    return make


class _Acc:
    """The accelerator surface Step uses, for one process (training itself runs through accelerate)."""

    num_processes, process_index, device = 1, 0, torch.device("cpu")

    def unwrap_model(self, m):
        return m

    def reduce(self, t, reduction="mean"):
        return t


def make_step(manifest, lora: bool = False):
    import copy

    cfg = manifest.train
    pipe, adapter = load_generator(manifest, torch.device("cpu"))
    policy = adapter.denoiser.requires_grad_(True).train()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    kind = "pairs" if cfg.method in ("pnapo", "dpo") else "labeled"
    path = manifest.stage_dir("pair" if kind == "pairs" else "threshold")
    from pipeline.shards import open_dataset

    available = set(open_dataset(path).features)
    batch = next(GlobalBatches(path, data_columns(cfg.method, available), cfg.batch_size, kind=kind).epoch(0))
    dynamic = DynamicBeta(2000.0, 1.0) if cfg.method == "pnapo" else None
    return Step(cfg, adapter, policy, reference, _Acc(), cfg.beta or (1.0 if cfg.method == "tgo" else 2000.0), dynamic), batch


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


def _one_sgd_step(step, batch) -> dict[str, float]:
    opt = torch.optim.SGD([p for p in step.policy.parameters() if p.requires_grad], lr=1e-6)  # small, first-order
    loss, _ = step(batch, 0, 0.0)
    loss.backward()
    opt.step()
    with torch.no_grad():
        return step(batch, 0, 0.0)[1]  # same batch, same noise and t


@pytest.mark.parametrize("label", [1, 0])
def test_one_tgo_step_raises_log_pi_of_positives_and_lowers_negatives(run_dir, label):
    step, batch = make_step(run_dir(method="tgo", batch_size=12))
    keep = [i for i, l in enumerate(batch["label"].tolist()) if l == label]
    assert keep
    only = {k: ([v[i] for i in keep] if isinstance(v, list) else v[keep]) for k, v in batch.items()}
    m = _one_sgd_step(step, only)
    assert (m["score_pos"] > 0) if label == 1 else (m["score_neg"] < 0)


@pytest.mark.parametrize("method", ["dpo", "pnapo"])
def test_one_pair_step_favours_winners_over_losers(run_dir, method):
    step, batch = make_step(run_dir(method=method))
    m = _one_sgd_step(step, batch)
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


def test_lora_weights_load_into_the_pipeline(run_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline
    from peft import LoraConfig
    from safetensors.torch import load_file

    manifest = run_dir("lora.yaml", method="tgo", lora={"rank": 4, "alpha": 4}, max_steps=2, learning_rate=1e-2,
                       output_dir=str(tmp_path / "lora"))
    out = train(manifest)
    done = json.loads((out / "done.json").read_text())
    assert done["format"] == "lora"
    base = manifest.generate.model
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kwargs = dict(prompt=["a red cat", "a blue dog"], num_inference_steps=2, height=16, width=16, output_type="np", latents=noise)
    loaded = StableDiffusion3Pipeline.from_pretrained(base)
    loaded.load_lora_weights(done["final"])
    trained = StableDiffusion3Pipeline.from_pretrained(base)  # the policy exactly as training left it
    trained.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    trained.transformer.load_state_dict(load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors")))
    plain = StableDiffusion3Pipeline.from_pretrained(base)
    a, b, c = loaded(**kwargs).images, trained(**kwargs).images, plain(**kwargs).images
    assert abs(a - b).max() < 1e-5 and abs(a - c).max() > 1e-4


def test_pnapo_refuses_pairs_without_noise(run_dir, tmp_path):
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
    pairs = run_pair(ext)
    with pytest.raises(StageError, match="PNAPO needs both samples' recorded prior noise and these pairs have none"):
        train(run_dir("ext-train.yaml", method="pnapo", data=str(pairs), output_dir=str(tmp_path / "x")))


@pytest.mark.slow
def test_two_processes_match_one(run_dir, tmp_path):
    one = train(run_dir("one.yaml", method="pnapo", max_steps=3, output_dir=str(tmp_path / "one")))
    two_manifest = run_dir("two.yaml", method="pnapo", max_steps=3, output_dir=str(tmp_path / "two"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--cpu", "-m", "trainer",
           two_manifest.source]
    subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    assert _losses(tmp_path / "two" / "train" / "pnapo") == pytest.approx(_losses(one), rel=1e-4, abs=1e-6)
