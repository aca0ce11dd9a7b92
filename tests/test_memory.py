"""The memory estimate: exact parameter bytes and LoRA counts on tiny saved pipelines, sane orderings, calibration."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tests.conftest import write_manifest

from pipeline.config import load_manifest
from pipeline.errors import StageError
from trainer.memory import Settings, build_meta, estimate, estimate_for_manifest, lora_parameters, module_bytes, read_pipeline


@pytest.mark.parametrize(("family", "dtype"), [("sd", torch.float32), ("sd", torch.bfloat16), ("sd3", torch.float32)])
def test_parameter_bytes_equal_the_loaded_modules(tiny_model, family: str, dtype: torch.dtype) -> None:
    from diffusers import DiffusionPipeline

    path = tiny_model(family)
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype)
    components = read_pipeline(path)
    loaded = {k: v for k, v in pipe.components.items() if isinstance(v, torch.nn.Module)}
    assert {c.name for c in components} == set(loaded)
    for c in components:
        real = loaded[c.name]
        want = sum(t.numel() * t.element_size() for t in [*real.parameters(), *real.buffers()])
        assert module_bytes(build_meta(c), dtype) == want, c.name


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_lora_count_equals_peft(tiny_model, family: str) -> None:
    from diffusers import DiffusionPipeline
    from peft import LoraConfig

    path = tiny_model(family)
    name = "unet" if family == "sd" else "transformer"
    meta = build_meta(next(c for c in read_pipeline(path) if c.name == name))
    real = getattr(DiffusionPipeline.from_pretrained(path), name).requires_grad_(False)
    targets = ("to_q", "to_k", "to_v", "to_out.0")
    real.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    peft_count = sum(p.numel() for p in real.parameters() if p.requires_grad)
    assert peft_count > 0
    assert lora_parameters(meta, 4, targets) == peft_count


def test_estimates_order_sanely(tiny_model) -> None:
    components = read_pipeline(tiny_model("sd3"))
    base = Settings(batch_size=4, height=32, width=32, frozen_dtype="bfloat16")
    full = estimate(components, base)
    assert estimate(components, replace(base, lora_rank=4)).total < full.total
    assert full.total < estimate(components, replace(base, frozen_dtype="float32")).total
    assert estimate(components, replace(base, optimizer="adamw8bit")).total < full.total
    assert full.total < estimate(components, replace(base, batch_size=8)).total
    assert estimate(components, replace(base, reference=False)).total < full.total


def test_calibrated_on_the_measured_point() -> None:
    """SD 1.5 UNet full FT, 16 samples at 512 px, bf16 autocast, AdamW: 39 GB measured on an H100. Checkpointing
    its 38 blocks keeps much less (a 1-block tiny model would keep more: its inputs and its whole block)."""
    from benchmarks.architectures import ARCHITECTURES

    e = estimate(ARCHITECTURES["SD 1.5"], Settings(batch_size=16))
    assert e.parameters["unet"] == 859_520_964
    assert e.total == pytest.approx(39e9, rel=0.01)
    checkpointed = estimate(ARCHITECTURES["SD 1.5"], Settings(batch_size=16, gradient_checkpointing=True))
    assert checkpointed.items["activations (checkpointed)"] < e.items["activations"] / 2


def test_manifest_estimate_and_bad_model(tmp_path: Path, tiny_model, prompts_file) -> None:
    data = {"run": {"name": "m", "output_dir": str(tmp_path / "out")},
            "generate": {"model": str(tiny_model("sd")), "prompts": str(prompts_file), "height": 16, "width": 16},
            "train": {"methods": ["dpo", "tgo"], "lora": {"rank": 2}}}
    text = estimate_for_manifest(load_manifest(write_manifest(tmp_path / "m.yaml", data)))
    assert "### dpo" in text and "### tgo" in text and "LoRA r2" in text and "**total**" in text
    with pytest.raises(StageError, match="model_index.json"):
        read_pipeline(tmp_path)


@pytest.mark.parametrize(("train", "frozen"), [({}, "float32"), ({"mixed_precision": "bf16"}, "bfloat16"),
                                               ({"mixed_precision": "bf16", "frozen_dtype": "fp32"}, "float32")])
def test_manifest_estimate_counts_frozen_weights_as_the_trainer_loads_them(tmp_path: Path, tiny_model, prompts_file,
                                                                            train: dict, frozen: str) -> None:
    data = {"run": {"name": "m", "output_dir": str(tmp_path / "out")},
            "generate": {"model": str(tiny_model("sd")), "prompts": str(prompts_file), "height": 16, "width": 16},
            "train": {"method": "dpo", **train}}
    text = estimate_for_manifest(load_manifest(write_manifest(tmp_path / "m.yaml", data)))
    assert f"frozen weights {frozen}" in text and f"| vae ({frozen}) |" in text and f"| reference copy ({frozen}) |" in text


def test_train_dry_run_prints_the_estimate_and_trains_nothing(tmp_path: Path, tiny_model, prompts_file, capsys) -> None:
    from pipeline.cli import main

    data = {"run": {"name": "m", "output_dir": str(tmp_path / "out")},
            "generate": {"model": str(tiny_model("sd")), "prompts": str(prompts_file), "height": 16, "width": 16},
            "train": {"method": "tgo", "mixed_precision": "bf16"}}
    assert main(["train", str(write_manifest(tmp_path / "m.yaml", data)), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "### tgo" in out and "frozen weights bfloat16" in out and "**total**" in out
    assert not (tmp_path / "out").exists()
