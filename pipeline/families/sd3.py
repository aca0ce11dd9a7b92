"""Stable Diffusion 3: the rectified-flow family (a transformer predicting the velocity from noise to image).

Noise: latents (C, H/f, W/f), passed as `latents=`. Training: x_t = (1 - sigma) x0 + sigma eps with target
v = eps - x0; sigma is drawn from the scheduler's training sigmas at a logit-normal (default) or uniform
position. SD3's transformer takes timestep = 1000 sigma.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

import torch
from torch import nn

from pipeline.families.base import Family, per_sample_mse


class SD3Family(Family):
    kind = "rectified_flow"
    denoiser_name = "transformer"

    @cached_property
    def train_sigmas(self) -> torch.Tensor:
        """The scheduler's training sigmas, decreasing from 1 to ~1/N."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(self.pipe.scheduler.config).sigmas.float()

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompts, prompts, prompts, do_classifier_free_guidance=False, device=self.pipe.device, **self.text_kwargs
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def sample_t(self, n: int, gen: torch.Generator, cfg: Any) -> torch.Tensor:
        """Sigmas from the scheduler's training sigmas, at logit-normal or uniform positions."""
        if cfg.sigma_sampling == "logit_normal":
            u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=gen))
        else:
            u = torch.rand(n, generator=gen)
        sigmas = self.train_sigmas
        index = ((1 - u) * (len(sigmas) - 1)).round().long()
        return sigmas[index]

    def errors(self, model, x0, cond, eps, t):
        sigma = t.to(x0.device, x0.dtype).view(-1, 1, 1, 1)
        xt = (1 - sigma) * x0 + sigma * eps
        return self._velocity_errors(model, x0, xt, eps, sigma, cond)

    def _velocity_errors(self, model: nn.Module, x0: torch.Tensor, xt: torch.Tensor, eps: torch.Tensor,
                         sigma: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample error of the model's velocity at (xt, sigma) (B, 1, 1, 1) against eps - x0."""
        v = model(hidden_states=xt, timestep=sigma.flatten() * 1000, return_dict=False, **cond)[0]
        return per_sample_mse(v, eps - x0)
