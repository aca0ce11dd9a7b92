"""The trainer on every family's tiny pipeline (SD 1.5, SDXL, SD3, FLUX, aMUSEd): losses start at their closed
form, a step moves the right way, full and LoRA training save what the family's pipeline loads back."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.errors import StageError
from pipeline.families import family_of
from pipeline.generate import load_model
from tests.train_harness import make_step, one_sgd_step, prepare_run
from trainer.recipe import train

FAMILIES = ["sd", "sdxl", "sd3", "flux", "amused"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model):
    """family -> manifest factory of a tiny generated, scored, labeled and paired run (built on first use)."""
    made = {}

    def get(family: str):
        if family not in made:
            made[family] = prepare_run(tmp_path_factory.mktemp(f"train-{family}"), tiny_model(family))
        return made[family]

    return get


def _images(pipe, seed: int = 0):
    """Two images from fixed prior noise (or, for aMUSEd, a fixed seed)."""
    family = family_of(pipe, height=16, width=16)
    if family.noise_shape is None:  # MaskGIT: a seeded generator for the call
        kwargs = family.call_kwargs(None, [seed])
    else:
        kwargs = family.call_kwargs(torch.randn(2, *family.noise_shape, generator=torch.Generator().manual_seed(seed)), [])
    return pipe(prompt=["a red cat", "a blue dog"], num_inference_steps=2, height=16, width=16, guidance_scale=2.0,
                output_type="np", **kwargs).images


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux", "amused"])  # SD3: test_trainer.py
@pytest.mark.parametrize(("method", "closed_form"), [("tgo", None), ("dpo", math.log(2))])
def test_losses_at_init_have_closed_form_and_gradient(runs, family, method, closed_form):
    step, batch = make_step(runs(family)(method=method))
    loss, _ = step(batch, 0, 0.0)
    if method == "tgo":
        closed_form = batch["weight"].mean().item() * math.log(2)
    assert loss.item() == pytest.approx(closed_form, rel=1e-5)
    loss.backward()
    assert sum(p.grad.abs().sum() for p in step.policy.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in step.reference.parameters())


@pytest.mark.parametrize("family", ["sd", "sdxl", "flux", "amused"])
def test_one_dpo_step_favours_winners_over_losers(runs, family):
    step, batch = make_step(runs(family)(method="dpo"))
    m = one_sgd_step(step, batch)
    assert m["score_winner"] - m["score_loser"] > 0


def test_flux_pnapo_reads_the_recorded_noise(runs):
    step, batch = make_step(runs("flux")(method="pnapo"))
    with torch.no_grad():
        for p in step.policy.parameters():  # off the reference, so the loss depends on its inputs
            p.add_(0.01 * torch.randn_like(p))
        changed = {**batch, "winner_noise": batch["winner_noise"] + 1.0}
        assert step(batch, 0, 0.5)[0].item() != pytest.approx(step(changed, 0, 0.5)[0].item(), rel=1e-6)


def test_pnapo_on_maskgit_is_refused_by_name(runs, tmp_path):
    manifest = runs("amused")("pnapo.yaml", method="pnapo", output_dir=str(tmp_path / "p"))
    with pytest.raises(StageError, match="PNAPO needs both samples' recorded prior noise .* a MaskGIT model"):
        train(manifest)


@pytest.mark.parametrize("family", ["sd", "flux", "amused"])
def test_full_fine_tune_with_checkpointing_and_8bit_adam_saves_a_loadable_pipeline(runs, family, tmp_path):
    pytest.importorskip("bitsandbytes")
    manifest = runs(family)("full.yaml", method="tgo", max_steps=2, learning_rate=1e-2, gradient_checkpointing=True,
                            use_8bit_adam=True, output_dir=str(tmp_path / "full"))
    out = train(manifest)
    done = json.loads((out / "done.json").read_text())
    trained, base = load_model(done["final"]), load_model(manifest.generate.model)
    moved = [(a - b).abs().max().item() for a, b in zip(family_of(trained).denoiser.parameters(), family_of(base).denoiser.parameters(), strict=True)]
    assert max(moved) > 0  # the optimizer really stepped
    assert abs(_images(trained) - _images(base)).max() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_weights_load_into_the_pipeline(runs, family, tmp_path):
    from peft import LoraConfig
    from safetensors.torch import load_file

    manifest = runs(family)("lora.yaml", method="tgo", lora={"rank": 4, "alpha": 4}, max_steps=2, learning_rate=1e-2,
                            output_dir=str(tmp_path / "lora"))
    out = train(manifest)
    done = json.loads((out / "done.json").read_text())
    base = manifest.generate.model
    loaded = load_model(base)
    assert done["format"] == ("lora_adapter" if family == "amused" else "lora")  # no load_lora_weights on aMUSEd
    family_of(loaded).load_lora(done["final"])  # what eval does
    trained = load_model(base)  # the policy exactly as training left it
    denoiser = family_of(trained).denoiser
    denoiser.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    denoiser.load_state_dict(load_file(str(out / "checkpoints" / "checkpoint-2" / "model.safetensors")))
    a, b, c = _images(loaded), _images(trained), _images(load_model(base))
    assert abs(a - b).max() < 1e-5 and abs(a - c).max() > 1e-4
