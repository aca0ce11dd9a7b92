"""Stable Diffusion 1.5: the diffusion family (a UNet predicting noise or velocity).

Noise: latents (C, H/f, W/f), passed unscaled as `latents=`. Training: x_t = scheduler.add_noise(x0, eps, t)
with t uniform over the training timesteps of a DDPM scheduler built from the pipeline's scheduler config;
the target is eps, or the velocity when the scheduler's prediction_type is v_prediction.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from pipeline.families.base import Family, per_sample_mse


class SDFamily(Family):
    kind = "diffusion"
    denoiser_name = "unet"

    @cached_property
    def train_scheduler(self) -> Any:
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.pipe.scheduler.config)

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _ = self.pipe.encode_prompt(prompts, self.pipe.device, 1, False)
        return {"encoder_hidden_states": embeds}

    def sample_t(self, n: int, gen: torch.Generator, cfg: Any) -> torch.Tensor:
        return torch.randint(0, self.train_scheduler.config.num_train_timesteps, (n,), generator=gen)

    def errors(self, model, x0, cond, eps, t):
        scheduler = self.train_scheduler
        t = t.to(x0.device)
        noisy = scheduler.add_noise(x0, eps, t)
        pred = model(noisy, t, return_dict=False, **self._unet_kwargs(x0, cond))[0]
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(x0, eps, t)
        else:
            target = eps
        return per_sample_mse(pred, target)

    def _unet_kwargs(self, x0: torch.Tensor, cond: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The UNet's conditioning for latents x0 from the encoded prompts."""
        return {"encoder_hidden_states": cond["encoder_hidden_states"]}
