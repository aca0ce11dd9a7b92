"""FLUX: the rectified-flow family of SD3, on latents packed into 2x2 patches.

Noise: the unpacked latents (C, 2 (H // 2f), 2 (W // 2f)) are recorded, and packed into a sequence of 2x2
patches (B, HW/4, 4C) only to call the pipeline; its final latent is unpacked back before it is recorded.
Training: the transformer takes the packed x_t, timestep = sigma itself, image position ids, all-zero text
position ids (rebuilt per batch from the sequence length), and, for guidance-distilled FLUX-dev, the guidance
scale the data was sampled with.
"""

from __future__ import annotations

import torch

from pipeline.families.base import per_sample_mse
from pipeline.families.sd3 import SD3Family


class FluxFamily(SD3Family):
    @property
    def noise_shape(self) -> tuple[int, int, int]:
        f = self.pipe.vae_scale_factor
        return (self.denoiser.config.in_channels // 4, 2 * (self.height // (f * 2)), 2 * (self.width // (f * 2)))

    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def _unpack(self, latents: torch.Tensor) -> torch.Tensor:
        return self.pipe._unpack_latents(latents, self.height, self.width, self.pipe.vae_scale_factor)

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.pipe.device, **self.text_kwargs)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def _velocity_errors(self, model, x0, xt, eps, sigma, cond):
        b, c, h, w = x0.shape
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x0.device, dtype=torch.float32)
        v = model(
            hidden_states=self._pack(xt), timestep=sigma.flatten(), guidance=guidance,
            txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x0.device, dtype=x0.dtype),
            img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype),
            return_dict=False, **cond,
        )[0]
        return per_sample_mse(v, self._pack(eps - x0))  # the same mean over the same elements
