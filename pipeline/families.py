"""Model families: how each diffusers pipeline takes its prior noise.

- diffusion (StableDiffusion, StableDiffusionXL): latents (C, H/f, W/f), passed unscaled as `latents=`
  (the pipeline multiplies by the scheduler's init_noise_sigma itself).
- rectified flow (StableDiffusion3, Flux): latents (C, H/f, W/f); FLUX takes them packed into 2x2 patches,
  so the unpacked noise is recorded and packed only to call the pipeline.
- maskgit (Amused): no continuous noise; randomness comes from a generator seeded with the sample's seed.
  The pipeline takes one generator per call, so samples are generated one at a time to stay reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import StageError

FAMILIES = {
    "StableDiffusionPipeline": "diffusion",
    "StableDiffusionXLPipeline": "diffusion",
    "StableDiffusion3Pipeline": "rectified_flow",
    "FluxPipeline": "rectified_flow",
    "AmusedPipeline": "maskgit",
}


def family_of(pipe: Any) -> str:
    name = type(pipe).__name__
    if name not in FAMILIES:
        raise StageError(f"unsupported pipeline class {name}; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The trained network: the UNet (diffusion) or the transformer (rectified flow, MaskGIT)."""
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def lora_format(pipe: Any) -> str:
    """How a LoRA for `pipe` is stored: 'lora' (the pipeline's own `save/load_lora_weights`), or 'lora_adapter'
    (pipelines without LoRA loading, e.g. AmusedPipeline: the denoiser's peft adapter format)."""
    return "lora" if hasattr(pipe, "load_lora_weights") else "lora_adapter"


def load_lora(pipe: Any, path: str | Path) -> None:
    """Load a LoRA saved by `tauflow train` into `pipe`, in its family's format."""
    if lora_format(pipe) == "lora":
        pipe.load_lora_weights(str(path))
    else:
        denoiser_of(pipe).load_lora_adapter(str(path), prefix=None, use_safetensors=True)


@dataclass(frozen=True)
class NoiseLayout:
    """How one pipeline's prior noise is shaped and handed to it."""

    pipe: Any
    height: int
    width: int

    @property
    def family(self) -> str:
        return family_of(self.pipe)

    @property
    def max_batch(self) -> int | None:
        return 1 if self.family == "maskgit" else None

    @property
    def shape(self) -> tuple[int, int, int] | None:
        """The unpacked latent shape (C, H, W), or None when the family has no continuous noise."""
        pipe, name = self.pipe, type(self.pipe).__name__
        if self.family == "maskgit":
            return None
        f = pipe.vae_scale_factor
        if name == "FluxPipeline":
            return (pipe.transformer.config.in_channels // 4, 2 * (self.height // (f * 2)), 2 * (self.width // (f * 2)))
        return (denoiser_of(pipe).config.in_channels, self.height // f, self.width // f)

    def capture_final_latents(self, store: list) -> dict[str, Any]:
        """Keyword arguments that record the sampler's final latent (unpacked, like the noise) into `store`.

        Training pairs each recorded noise with this exact endpoint: re-encoding the decoded image through the
        VAE can land far from it (30% relative error measured on the demo world's small VAE)."""
        if self.family == "maskgit":
            return {}
        pipe, flux = self.pipe, type(self.pipe).__name__ == "FluxPipeline"

        def on_step_end(pipeline, step: int, timestep, tensors: dict) -> dict:
            if step == pipeline.num_timesteps - 1:
                latents = tensors["latents"]
                if flux:
                    latents = pipe._unpack_latents(latents, self.height, self.width, pipe.vae_scale_factor)
                store.append(latents.detach().float().cpu())
            return tensors

        return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}

    def call_kwargs(self, noise: torch.Tensor | None, seeds: list[int]) -> dict[str, Any]:
        """Keyword arguments that make the pipeline start from `noise` (B, C, H, W) or from `seeds`."""
        if self.family == "maskgit":
            (seed,) = seeds
            return {"generator": torch.Generator("cpu").manual_seed(seed)}
        latents = noise.to(device=self.pipe.device, dtype=self.pipe.dtype)
        if type(self.pipe).__name__ == "FluxPipeline":
            b, c, h, w = latents.shape
            latents = self.pipe._pack_latents(latents, b, c, h, w)
        return {"latents": latents}
