"""Likelihood proxies, one adapter per model family.

An adapter knows how its family turns (image latents x0, prompt, noise, t) into a per-sample denoising error
e = mean((prediction - target)^2); log pi(y|x) is approximated by -e (up to the temperature). Policy and
reference are evaluated on the same noisy input.

- rectified flow (SD3): x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0, sigma drawn from the
  scheduler's training sigmas at a logit-normal (default) or uniform position; transformer timestep = 1000 sigma.
- diffusion (SD 1.5 / SDXL UNet): x_t = scheduler.add_noise(x0, eps, t) with t uniform over the training
  timesteps; the target is eps or the velocity, as the scheduler's prediction_type says.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.errors import StageError
from pipeline.families import family_of


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))


class Adapter:
    """What the training loop needs from a pipeline; subclasses fill in one family."""

    family: str
    denoiser_name: str

    def __init__(self, pipe: Any, text_kwargs: dict[str, Any]):
        self.pipe = pipe
        self.text_kwargs = text_kwargs
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}

    @property
    def denoiser(self) -> nn.Module:
        return getattr(self.pipe, self.denoiser_name)

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

    def sample_t(self, n: int, gen: torch.Generator, cfg: Any) -> torch.Tensor:
        raise NotImplementedError

    def errors(self, model: nn.Module, x0: torch.Tensor, cond: dict[str, torch.Tensor], eps: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RectifiedFlowAdapter(Adapter):
    family = "rectified_flow"
    denoiser_name = "transformer"

    def __init__(self, pipe: Any, text_kwargs: dict[str, Any]):
        super().__init__(pipe, text_kwargs)
        if type(pipe).__name__ != "StableDiffusion3Pipeline":
            raise StageError(f"training {type(pipe).__name__} is not supported yet (rectified flow: StableDiffusion3Pipeline)")
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.train_sigmas = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas.float()

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
        sigmas = self.train_sigmas  # decreasing from 1 to ~1/N
        index = ((1 - u) * (len(sigmas) - 1)).round().long()
        return sigmas[index]

    def errors(self, model, x0, cond, eps, t):
        sigma = t.to(x0.device, x0.dtype).view(-1, 1, 1, 1)
        xt = (1 - sigma) * x0 + sigma * eps
        v = model(hidden_states=xt, timestep=sigma.flatten() * 1000, return_dict=False, **cond)[0]
        return per_sample_mse(v, eps - x0)


class DiffusionAdapter(Adapter):
    family = "diffusion"
    denoiser_name = "unet"

    def __init__(self, pipe: Any, text_kwargs: dict[str, Any]):
        super().__init__(pipe, text_kwargs)
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.xl = type(pipe).__name__ == "StableDiffusionXLPipeline"

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        device = self.pipe.device
        if not self.xl:
            embeds, _ = self.pipe.encode_prompt(prompts, device, 1, False)
            return {"encoder_hidden_states": embeds}
        embeds, _, pooled, _ = self.pipe.encode_prompt(prompts, device=device, do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "text_embeds": pooled}

    def sample_t(self, n: int, gen: torch.Generator, cfg: Any) -> torch.Tensor:
        return torch.randint(0, self.scheduler.config.num_train_timesteps, (n,), generator=gen)

    def errors(self, model, x0, cond, eps, t):
        t = t.to(x0.device)
        noisy = self.scheduler.add_noise(x0, eps, t)
        kwargs = {"encoder_hidden_states": cond["encoder_hidden_states"]}
        if self.xl:
            h, w = x0.shape[-2] * self.pipe.vae_scale_factor, x0.shape[-1] * self.pipe.vae_scale_factor
            time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=x0.dtype, device=x0.device).expand(len(x0), -1)
            kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"], "time_ids": time_ids}
        pred = model(noisy, t, return_dict=False, **kwargs)[0]
        if self.scheduler.config.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(x0, eps, t)
        else:
            target = eps
        return per_sample_mse(pred, target)


def adapter_for(pipe: Any, text_kwargs: dict[str, Any]) -> Adapter:
    family = family_of(pipe)
    if family == "rectified_flow":
        return RectifiedFlowAdapter(pipe, text_kwargs)
    if family == "diffusion":
        return DiffusionAdapter(pipe, text_kwargs)
    raise StageError(f"training the {family} family ({type(pipe).__name__}) is not supported yet")
