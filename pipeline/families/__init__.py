"""Model families: everything tauflow knows about one kind of diffusers pipeline, in one object per family.

A family says how generation hands the pipeline its prior noise and records the final latent
(`noise_shape`, `max_batch`, `call_kwargs`, `capture_final_latents`), how its LoRA weights are stored
(`lora_format`, `save_lora`, `load_lora`), and how training scores a sample (`denoiser`, `encode_images`,
`encode_prompts`, `sample_t`, `errors`, `enable_gradient_checkpointing`); see `base.Family`.

    family = family_of(pipe, height=512, width=512, guidance_scale=3.5, text_kwargs={})

The shared code lives in base classes: `base.Family` (continuous latents, the pipeline's own LoRA format),
`sd.SDFamily` (diffusion; SDXL overrides its conditioning) and `sd3.SD3Family` (rectified flow; FLUX overrides
its latent packing and conditioning). aMUSEd (MaskGIT) overrides the rest.

Adding a family is one new file plus its tests: a `Family` subclass in its own module, registered below under
its diffusers pipeline class name. This registry is the only place that names pipeline classes.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import StageError
from pipeline.families.amused import AmusedFamily
from pipeline.families.base import Family
from pipeline.families.flux import FluxFamily
from pipeline.families.sd import SDFamily
from pipeline.families.sd3 import SD3Family
from pipeline.families.sdxl import SDXLFamily

FAMILIES: dict[str, type[Family]] = {
    "StableDiffusionPipeline": SDFamily,
    "StableDiffusionXLPipeline": SDXLFamily,
    "StableDiffusion3Pipeline": SD3Family,
    "FluxPipeline": FluxFamily,
    "AmusedPipeline": AmusedFamily,
}

__all__ = ["FAMILIES", "Family", "family_of"]


def family_of(pipe: Any, *, height: int = 512, width: int = 512, guidance_scale: float = 3.5,
              text_kwargs: dict[str, Any] | None = None) -> Family:
    """`pipe` seen through its family. The image size and guidance scale are those the images were (or will
    be) generated with; the defaults stand in when training has no generate section (FLUX-dev's usual 3.5)."""
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise StageError(f"unsupported pipeline class {name}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name](pipe, height=height, width=width, guidance_scale=guidance_scale, text_kwargs=text_kwargs or {})
