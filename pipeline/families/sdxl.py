"""Stable Diffusion XL: the diffusion family of SD 1.5, conditioned on two text encoders.

Its UNet also takes the second encoder's pooled embedding (`text_embeds`) and micro-conditioning time ids
(original size, crop top-left, target size), here the full, uncropped image size of the latents.
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.families.sd import SDFamily


class SDXLFamily(SDFamily):
    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        pipe = self.pipe
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=pipe.device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def _unet_kwargs(self, x0: torch.Tensor, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        h, w = x0.shape[-2] * self.pipe.vae_scale_factor, x0.shape[-1] * self.pipe.vae_scale_factor
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=x0.dtype, device=x0.device).expand(len(x0), -1)
        added = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        return {**super()._unet_kwargs(x0, cond), "added_cond_kwargs": added}
