"""The Family base: what generation and training need from one kind of diffusers pipeline.

Generation records each sample's prior noise in the model's *unpacked* latent layout (C, H, W) and hands it to
the pipeline as its starting latents; it also records the sampler's final latent, the exact endpoint training
pairs with that noise (re-encoding the decoded image through the VAE can land far from it: 30% relative error
on the demo world's small VAE).

Training scores a sample by a likelihood proxy: the family turns (image latents x0, prompt, noise eps, t) into a
per-sample denoising error e = mean((prediction - target)^2), and log pi(y|x) is approximated by -e (up to the
temperature). Policy and reference are evaluated on the same noisy input, so their difference isolates the
weights.

The defaults here are those of a continuous-latent family whose pipeline has `save/load_lora_weights`;
subclasses fill in the noising, the target and the conditioning.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


class Family:
    """One loaded pipeline seen through its family.

    `height`, `width` and `guidance_scale` are those the images were (or will be) generated with: the noise
    shape and some families' conditioning (FLUX-dev's distilled guidance, aMUSEd's micro-conditioning) depend
    on them. `text_kwargs` are extra keyword arguments of the pipeline's `encode_prompt`.
    """

    kind: str  # "diffusion" | "rectified_flow" | "maskgit"
    denoiser_name: str  # the trained network's attribute on the pipeline
    lora_format = "lora"  # the pipeline's own `save/load_lora_weights` format
    max_batch: int | None = None  # samples per pipeline call; None: the configured batch size

    def __init__(self, pipe: Any, *, height: int, width: int, guidance_scale: float, text_kwargs: dict[str, Any]):
        self.pipe = pipe
        self.height, self.width = height, width
        self.guidance_scale = guidance_scale
        self.text_kwargs = text_kwargs
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

    # --- generation ---

    @property
    def noise_shape(self) -> tuple[int, int, int] | None:
        """The unpacked prior-noise shape (C, H, W), or None when the family records no continuous noise."""
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels, self.height // f, self.width // f)

    def call_kwargs(self, noise: torch.Tensor | None, seeds: list[int]) -> dict[str, Any]:
        """Keyword arguments that make the pipeline start from `noise` (B, C, H, W) or from `seeds`.

        The noise is passed unscaled: the pipeline multiplies it by its scheduler's init_noise_sigma itself."""
        latents = noise.to(device=self.pipe.device, dtype=self.pipe.dtype)
        return {"latents": self._pack(latents)}

    def capture_final_latents(self, store: list) -> dict[str, Any]:
        """Keyword arguments that append the sampler's final latent (unpacked, like the noise) to `store`."""

        def on_step_end(pipeline, step: int, timestep, tensors: dict) -> dict:
            if step == pipeline.num_timesteps - 1:
                store.append(self._unpack(tensors["latents"]).detach().float().cpu())
            return tensors

        return {"callback_on_step_end": on_step_end, "callback_on_step_end_tensor_inputs": ["latents"]}

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        """Unpacked (B, C, H, W) latents -> the layout the pipeline samples in (the same, unless overridden)."""
        return latents

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    # --- LoRA weights ---

    def save_lora(self, denoiser: nn.Module, directory: Path) -> None:
        """Save `denoiser`'s LoRA layers where `load_lora` reads them."""
        from peft.utils import get_peft_model_state_dict

        layers = get_peft_model_state_dict(denoiser)
        type(self.pipe).save_lora_weights(str(directory), **{f"{self.denoiser_name}_lora_layers": layers})

    def load_lora(self, directory: str | Path) -> None:
        """Load a LoRA saved by `save_lora` (`tauflow train`) into the pipeline."""
        self.pipe.load_lora_weights(str(directory))

    # --- training ---

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> latents x0 (deterministic: the posterior mean)."""
        vae = self.pipe.vae
        x = pixels.to(vae.device, vae.dtype) / 127.5 - 1
        z = vae.encode(x).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (z - shift) * vae.config.scaling_factor

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], cache: bool = True) -> dict[str, torch.Tensor]:
        """Conditioning for `prompts`. Cached prompts are encoded one at a time, so a cached embedding does
        not depend on which batch first met it (batched kernels differ by ~1e-6) and resumes stay exact."""
        if not cache:
            return self._encode_text(prompts)
        for p in dict.fromkeys(prompts):
            if p not in self._text_cache:
                self._text_cache[p] = {k: v[0] for k, v in self._encode_text([p]).items()}
        rows = [self._text_cache[p] for p in prompts]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        model.enable_gradient_checkpointing()

    def sample_t(self, n: int, gen: torch.Generator, cfg: Any) -> torch.Tensor:
        """n training times drawn from `gen` (the train section `cfg` may choose how)."""
        raise NotImplementedError

    def errors(self, model: nn.Module, x0: torch.Tensor, cond: dict[str, torch.Tensor], eps: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        """Per-sample denoising error (B,) of `model` on x0 (B, C, H, W) noised by eps (B, C, H, W) at t (B,)."""
        raise NotImplementedError
