"""Likelihood proxies, one adapter per model family.

An adapter knows how its family turns (image latents x0, prompt, noise, t) into a per-sample denoising error
e = mean((prediction - target)^2); log pi(y|x) is approximated by -e (up to the temperature). Policy and
reference are evaluated on the same noisy input.

- rectified flow (SD3, FLUX): x_t = (1 - sigma) x0 + sigma eps, target v = eps - x0, sigma drawn from the
  scheduler's training sigmas at a logit-normal (default) or uniform position. SD3's transformer takes
  timestep = 1000 sigma; FLUX's takes sigma, packed 2x2 latent patches, position ids, and (FLUX-dev) the
  distilled guidance scale the data was sampled with.
- diffusion (SD 1.5 / SDXL UNet): x_t = scheduler.add_noise(x0, eps, t) with t uniform over the training
  timesteps; the target is eps or the velocity, as the scheduler's prediction_type says.
- maskgit (aMUSEd): x0 are the image's VQ tokens; t is a time in (0, 1) whose cosine gives the masked share,
  and eps (one Gaussian per token) ranks the tokens: the lowest ranks are masked. e is the cross-entropy of
  the true tokens at the masked positions, so -e = mean log p(token | unmasked tokens, prompt).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

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

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        model.enable_gradient_checkpointing()

    def sample_t(self, n: int, gen: torch.Generator, cfg: Any) -> torch.Tensor:
        raise NotImplementedError

    def errors(self, model: nn.Module, x0: torch.Tensor, cond: dict[str, torch.Tensor], eps: torch.Tensor,
               t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class RectifiedFlowAdapter(Adapter):
    family = "rectified_flow"
    denoiser_name = "transformer"

    def __init__(self, pipe: Any, text_kwargs: dict[str, Any], guidance_scale: float):
        super().__init__(pipe, text_kwargs)
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.flux = type(pipe).__name__ == "FluxPipeline"
        self.guidance_scale = guidance_scale
        self.train_sigmas = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas.float()

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if self.flux:  # its text position ids are all zeros: rebuilt per batch from the sequence length
            embeds, pooled, _ = self.pipe.encode_prompt(prompts, prompts, device=self.pipe.device, **self.text_kwargs)
        else:
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
        if not self.flux:
            v = model(hidden_states=xt, timestep=sigma.flatten() * 1000, return_dict=False, **cond)[0]
            return per_sample_mse(v, eps - x0)
        b, c, h, w = x0.shape
        pack = self.pipe._pack_latents
        guidance = None
        if model.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance_scale, device=x0.device, dtype=torch.float32)
        v = model(
            hidden_states=pack(xt, b, c, h, w), timestep=sigma.flatten(), guidance=guidance,
            txt_ids=torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=x0.device, dtype=x0.dtype),
            img_ids=self.pipe._prepare_latent_image_ids(b, h // 2, w // 2, x0.device, x0.dtype),
            return_dict=False, **cond,
        )[0]
        return per_sample_mse(v, pack(eps - x0, b, c, h, w))  # the same mean over the same elements


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


class MaskGITAdapter(Adapter):
    family = "maskgit"
    denoiser_name = "transformer"

    def __init__(self, pipe: Any, text_kwargs: dict[str, Any], height: int, width: int):
        super().__init__(pipe, text_kwargs)
        self.mask_id = pipe.scheduler.config.mask_token_id
        self.height, self.width = height, width

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, H, W) -> VQ token ids (B, 1, h, w) (the singleton axis keeps the loop's 4-d shapes)."""
        vq = self.pipe.vqvae
        x = pixels.to(vq.device, vq.dtype) / 255.0  # aMUSEd's VQ model works on [0, 1] images
        z = vq.encode(x).latents
        ids = vq.quantize(z)[2][2]
        return ids.reshape(len(x), 1, z.shape[-2], z.shape[-1])

    def _encode_text(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        tok = self.pipe.tokenizer
        ids = tok(prompts, return_tensors="pt", padding="max_length", truncation=True, max_length=tok.model_max_length)
        out = self.pipe.text_encoder(ids.input_ids.to(self.pipe.device), return_dict=True, output_hidden_states=True)
        return {"encoder_hidden_states": out.hidden_states[-2], "pooled_text_emb": out.text_embeds}

    def sample_t(self, n: int, gen: torch.Generator, cfg: Any) -> torch.Tensor:
        return torch.rand(n, generator=gen)

    def enable_gradient_checkpointing(self, model: nn.Module) -> None:
        """UVit2DModel's own switch is broken (diffusers 0.42: its wrapper drops the layers' keyword
        arguments), so each transformer layer is checkpointed here instead."""
        for layer in model.transformer_layers:
            layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)

    def errors(self, model, x0, cond, eps, t):
        tokens = x0.flatten(1).long()
        b, n = tokens.shape
        masked_share = torch.cos(t.to(tokens.device) * torch.pi / 2)  # the cosine schedule
        count = (masked_share * n).round().clamp(min=1).long()
        rank = eps.flatten(1).to(tokens.device).argsort(dim=1).argsort(dim=1)
        mask = rank < count[:, None]
        inputs = torch.where(mask, self.mask_id, tokens).reshape(x0.shape[0], *x0.shape[2:])
        micro = torch.tensor([self.width, self.height, 0, 0, 6], device=tokens.device, dtype=cond["pooled_text_emb"].dtype)
        logits = model(inputs, micro_conds=micro.expand(b, -1), **cond)  # (B, codebook, h, w)
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(2), tokens, reduction="none")
        return (nll * mask).sum(1) / mask.sum(1)


def adapter_for(pipe: Any, text_kwargs: dict[str, Any], *, guidance_scale: float = 3.5, height: int = 512,
                width: int = 512) -> Adapter:
    """The adapter of `pipe`'s family. `guidance_scale` (FLUX-dev's distilled guidance) and the image size
    (aMUSEd's micro-conditioning) are those the training data was generated with."""
    family = family_of(pipe)
    if family == "rectified_flow":
        return RectifiedFlowAdapter(pipe, text_kwargs, guidance_scale)
    if family == "diffusion":
        return DiffusionAdapter(pipe, text_kwargs)
    return MaskGITAdapter(pipe, text_kwargs, height, width)
