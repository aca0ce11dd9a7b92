"""How much GPU memory a training run needs, estimated before any weight is loaded.

Parameters are counted exactly: every component of a diffusers pipeline directory (model_index.json plus each
component's config) is built on the meta device, which allocates nothing. Training memory is then the sum of:

- frozen components (VAE, text encoders; and, for LoRA, the denoiser's base weights) at `frozen_dtype`;
- the frozen reference: for a full fine-tune a copy of the denoiser at `frozen_dtype`; none for LoRA (the base
  weights under a disabled adapter are the reference) or SFT;
- trainable weights in fp32 (full fine-tune: the denoiser; LoRA: r * (in + out) per targeted Linear, as peft
  builds them), their fp32 gradients, and the optimizer's two moments (AdamW: 8 bytes per trainable
  parameter; bitsandbytes' 8-bit AdamW: 2);
- activations kept for the backward pass. A forward pass of the denoiser on meta tensors at the training
  resolution records E, the elements output by its leaf modules per sample; activations are
  `ACTIVATION_FACTOR * E * samples * b`, with b = 2 bytes under fp16/bf16 autocast (else the compute dtype's
  size). With gradient checkpointing (diffusers checkpoints each resnet and transformer block), E becomes the
  elements entering each checkpointed block plus everything outside them, plus the largest block's own
  elements (recomputed during the backward pass).

ACTIVATION_FACTOR covers what a leaf keeps beyond its output (inputs of nonlinearities, normalisation
statistics, autocast copies of weights), the allocator's slack and the optimizer step's temporaries. It is
calibrated on the one measured point: SD 1.5's UNet fully fine-tuned with DPO on an H100, 8 pairs = 16
samples at 512 px, bf16 autocast, AdamW, fp32 policy, bf16 reference, VAE and text encoder: 39 GB peak
(torch.cuda.max_memory_allocated). Assumptions: the estimate is additive (weights, gradients, optimizer states
and all activations counted as live at once), one process (no sharding), attention through SDPA (no
materialised attention matrices), modules transformers keeps in fp32 (`_keep_in_fp32_modules`) counted at
`frozen_dtype`. The checkpointed figure reuses the same factor and has not been measured.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.errors import StageError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
DENOISERS = ("unet", "transformer")
CHECKPOINTED = re.compile(r"(^|\.)(resnets|transformer_blocks|single_transformer_blocks)\.\d+$")
# (39.0e9 B - 15.88e9 B of weights, gradients and AdamW states) / (16 samples * 2 B * 431.25e6 elements)
ACTIVATION_FACTOR = 1.675
GB = 1e9


@dataclass(frozen=True)
class Component:
    """One pipeline component as diffusers' model_index.json names it, with its config."""

    name: str
    library: str
    class_name: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Settings:
    """The training settings that decide memory. `batch_size` counts samples through the denoiser per step
    and process: a DPO/PNAPO pair counts twice."""

    batch_size: int
    height: int = 512
    width: int = 512
    lora_rank: int | None = None
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    frozen_dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    gradient_checkpointing: bool = False
    reference: bool = True  # a reference is needed (not SFT); LoRA uses the base weights, no copy


@dataclass(frozen=True)
class Estimate:
    """Bytes per item; `items` keeps the order of the table."""

    items: dict[str, int]
    parameters: dict[str, int]  # parameter count per component
    trainable: int
    settings: Settings = field(repr=False)

    @property
    def total(self) -> int:
        return sum(self.items.values())


def read_pipeline(directory: str | Path) -> list[Component]:
    """The torch components of a saved diffusers pipeline, from model_index.json and each <name>/config.json."""
    directory = Path(directory)
    index_path = directory / "model_index.json"
    if not index_path.exists():
        raise StageError(f"{directory}: not a diffusers pipeline directory (no model_index.json)")
    components = []
    for name, value in json.loads(index_path.read_text()).items():
        if name.startswith("_") or not isinstance(value, list) or value[0] not in ("diffusers", "transformers"):
            continue
        config_path = directory / name / "config.json"
        if not config_path.exists():  # schedulers, tokenizers: no weights
            continue
        components.append(Component(name, value[0], value[1], json.loads(config_path.read_text())))
    return components


def build_meta(component: Component) -> torch.nn.Module:
    """The component's module on the meta device: real shapes, no memory."""
    import diffusers
    import transformers

    library = diffusers if component.library == "diffusers" else transformers
    cls = getattr(library, component.class_name, None)
    if cls is None:
        raise StageError(f"{component.name}: {component.library} has no class {component.class_name}")
    with torch.device("meta"):
        if component.library == "diffusers":
            return cls.from_config(component.config)
        config = cls.config_class.from_dict({k: v for k, v in component.config.items() if k != "architectures"})
        return cls(config)


def module_bytes(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of parameters and buffers once the module is cast to `dtype` (floating tensors only are cast)."""
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        size = torch.empty((), dtype=dtype).element_size() if t.is_floating_point() else t.element_size()
        total += t.numel() * size
    return total


def lora_parameters(module: torch.nn.Module, rank: int, targets: tuple[str, ...]) -> int:
    """Parameters peft adds for a LoRA of `rank` on modules named (or ending in '.') one of `targets`."""
    total = 0
    for name, layer in module.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        if isinstance(layer, torch.nn.Linear):
            total += rank * (layer.in_features + layer.out_features)
        elif isinstance(layer, torch.nn.Conv2d):
            kh, kw = layer.kernel_size
            total += rank * layer.in_channels * kh * kw + layer.out_channels * rank
        else:
            raise StageError(f"LoRA target {name} is a {type(layer).__name__}; the estimate knows Linear and Conv2d")
    return total


def _denoiser_inputs(module: torch.nn.Module, height: int, width: int, vae_scale: int) -> dict[str, Any]:
    """One sample's inputs to the denoiser, on the meta device, at a training resolution."""
    cfg, h, w = module.config, height // vae_scale, width // vae_scale
    kind = type(module).__name__
    if kind == "UNet2DConditionModel":
        inputs = {"sample": torch.zeros(1, cfg.in_channels, h, w), "timestep": torch.zeros(1),
                  "encoder_hidden_states": torch.zeros(1, 77, cfg.cross_attention_dim)}
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            inputs["added_cond_kwargs"] = {"text_embeds": torch.zeros(1, pooled), "time_ids": torch.zeros(1, 6)}
        return inputs
    if kind == "SD3Transformer2DModel":  # 77 CLIP tokens + 256 T5 tokens
        return {"hidden_states": torch.zeros(1, cfg.in_channels, h, w), "timestep": torch.zeros(1),
                "encoder_hidden_states": torch.zeros(1, 77 + 256, cfg.joint_attention_dim),
                "pooled_projections": torch.zeros(1, cfg.pooled_projection_dim)}
    if kind == "FluxTransformer2DModel":  # 2x2 packed latents, 512 T5 tokens
        tokens = (h // 2) * (w // 2)
        inputs = {"hidden_states": torch.zeros(1, tokens, cfg.in_channels), "timestep": torch.zeros(1),
                  "encoder_hidden_states": torch.zeros(1, 512, cfg.joint_attention_dim),
                  "pooled_projections": torch.zeros(1, cfg.pooled_projection_dim),
                  "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(512, 3)}
        if cfg.guidance_embeds:
            inputs["guidance"] = torch.zeros(1)
        return inputs
    raise StageError(f"the memory estimate has no activation model for a {kind} denoiser")


def activation_elements(module: torch.nn.Module, height: int, width: int, vae_scale: int, checkpointing: bool) -> int:
    """E of the module docstring: elements kept per sample for the backward pass (a meta forward pass)."""
    outside, inside, entering = 0, {}, 0
    units = {m: name for name, m in module.named_modules() if CHECKPOINTED.search(name)}
    owner = {}
    for unit, name in units.items():
        for m in unit.modules():
            owner.setdefault(m, name)  # the outermost checkpointed block holding a leaf

    def count(value: Any) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, (tuple, list)):
            return sum(count(v) for v in value)
        return 0

    def on_leaf(m: torch.nn.Module, args: Any, out: Any) -> None:
        nonlocal outside
        if m in owner:
            inside[owner[m]] = inside.get(owner[m], 0) + count(out)
        else:
            outside += count(out)

    def on_unit(m: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        nonlocal entering
        if owner[m] == units[m]:  # outermost only
            entering += count(args) + count(list(kwargs.values()))

    hooks = [m.register_forward_hook(on_leaf) for m in module.modules() if not list(m.children())]
    hooks += [m.register_forward_pre_hook(on_unit, with_kwargs=True) for m in units]
    try:
        with torch.device("meta"), torch.no_grad():
            module(**_denoiser_inputs(module, height, width, vae_scale))
    finally:
        for h in hooks:
            h.remove()
    if not checkpointing:
        return outside + sum(inside.values())
    return outside + entering + max(inside.values(), default=0)


def estimate(components: list[Component], settings: Settings) -> Estimate:
    """The memory of training the pipeline's denoiser with `settings`; see the module docstring."""
    by_name = {c.name: c for c in components}
    denoiser_name = next((n for n in DENOISERS if n in by_name), None)
    if denoiser_name is None:
        raise StageError(f"no denoiser among the components {sorted(by_name)} (expected one of {DENOISERS})")
    frozen = getattr(torch, settings.frozen_dtype)
    items: dict[str, int] = {}
    parameters: dict[str, int] = {}
    vae_scale = 8
    for c in components:
        module = build_meta(c)
        parameters[c.name] = sum(p.numel() for p in module.parameters())
        if c.name == denoiser_name:
            denoiser = module
            continue
        if c.name in ("vae", "vqvae"):
            vae_scale = 2 ** (len(c.config["block_out_channels"]) - 1)
        items[f"{c.name} ({settings.frozen_dtype})"] = module_bytes(module, frozen)
    if settings.lora_rank is None:
        trainable = parameters[denoiser_name]
        items[f"{denoiser_name} trainable (float32)"] = module_bytes(denoiser, torch.float32)
        if settings.reference:
            items[f"reference copy ({settings.frozen_dtype})"] = module_bytes(denoiser, frozen)
    else:
        trainable = lora_parameters(denoiser, settings.lora_rank, settings.lora_targets)
        items[f"{denoiser_name} base ({settings.frozen_dtype})"] = module_bytes(denoiser, frozen)
        items[f"LoRA r{settings.lora_rank} (float32)"] = 4 * trainable
    items["gradients (float32)"] = 4 * trainable
    items[f"optimizer ({settings.optimizer})"] = (8 if settings.optimizer == "adamw" else 2) * trainable
    elements = activation_elements(denoiser, settings.height, settings.width, vae_scale, settings.gradient_checkpointing)
    compute = 4 if settings.lora_rank is None else DTYPE_BYTES[settings.frozen_dtype]
    per_element = 2 if settings.mixed_precision != "no" else compute
    label = "activations" + (" (checkpointed)" if settings.gradient_checkpointing else "")
    items[label] = int(ACTIVATION_FACTOR * elements * settings.batch_size * per_element)
    return Estimate(items, parameters, trainable, settings)


def render(estimate: Estimate) -> str:
    """A markdown table of one estimate, in GB (1e9 bytes)."""
    s = estimate.settings
    mode = f"LoRA r{s.lora_rank}" if s.lora_rank else "full fine-tune"
    lines = [f"{mode}, {s.batch_size} samples of {s.height}x{s.width} per step, frozen weights {s.frozen_dtype}, "
             f"mixed precision {s.mixed_precision}, {s.optimizer}, gradient checkpointing {'on' if s.gradient_checkpointing else 'off'}",
             "", "| item | GB |", "|---|---|"]
    lines += [f"| {k} | {v / GB:.2f} |" for k, v in estimate.items.items()]
    lines.append(f"| **total** | **{estimate.total / GB:.2f}** |")
    counts = ", ".join(f"{k} {v / 1e6:,.1f} M" for k, v in estimate.parameters.items())
    lines += ["", f"parameters: {counts}; trainable {estimate.trainable / 1e6:,.2f} M"]
    return "\n".join(lines)


def estimate_for_manifest(manifest) -> str:
    """The table for each method of the manifest's train section, for one process (`tauflow train --dry-run`).
    The model must be a local pipeline directory. Frozen weights are counted at train.frozen_dtype (resolved),
    the dtype the trainer loads them in."""
    cfg = manifest.require("train")
    gen = manifest.generate
    model = cfg.model or (gen.model if gen else None)
    if model is None or not Path(model).is_dir():
        raise StageError(f"{manifest.source}: the memory estimate needs train.model or generate.model to be a local "
                         f"pipeline directory (got {model!r})")
    components = read_pipeline(model)
    height, width = (gen.height, gen.width) if gen else (512, 512)
    tables = []
    for job in cfg.jobs():
        pairs = job.method in ("dpo", "pnapo")
        settings = Settings(
            batch_size=job.batch_size * (2 if pairs else 1), height=height, width=width,
            lora_rank=job.lora.rank if job.lora else None,
            lora_targets=tuple(job.lora.target_modules) if job.lora else Settings.lora_targets,
            frozen_dtype=job.frozen_torch_dtype, mixed_precision=job.mixed_precision,
            optimizer="adamw8bit" if job.use_8bit_adam else "adamw", gradient_checkpointing=job.gradient_checkpointing,
            reference=job.method != "sft" and job.reference_device == "same",
        )
        tables.append(f"### {job.method}\n\n{render(estimate(components, settings))}")
    return "\n\n".join(tables)
