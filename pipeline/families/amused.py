"""aMUSEd: the MaskGIT family (a transformer predicting masked VQ tokens).

Noise: none continuous; randomness comes from a generator seeded with the sample's seed. The pipeline takes
one generator per call, so samples are generated one at a time to stay reproducible. LoRA weights are stored
in the denoiser's peft adapter format, as the pipeline has no `save/load_lora_weights`.

Training: x0 are the image's VQ tokens (B, 1, h, w); t is a time in (0, 1) whose cosine gives the masked
share, and eps (one Gaussian per token) ranks the tokens: the lowest ranks are masked. e is the cross-entropy
of the true tokens at the masked positions, so -e = mean log p(token | unmasked tokens, prompt).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.families.base import Family


class AmusedFamily(Family):
    kind = "maskgit"
    denoiser_name = "transformer"
    lora_format = "lora_adapter"
    max_batch = 1

    @property
    def noise_shape(self) -> None:
        return None

    def call_kwargs(self, noise: torch.Tensor | None, seeds: list[int]) -> dict[str, Any]:
        (seed,) = seeds
        return {"generator": torch.Generator("cpu").manual_seed(seed)}

    def capture_final_latents(self, store: list) -> dict[str, Any]:
        return {}

    def save_lora(self, denoiser: nn.Module, directory: Path) -> None:
        denoiser.save_lora_adapter(str(directory))

    def load_lora(self, directory: str | Path) -> None:
        self.denoiser.load_lora_adapter(str(directory), prefix=None, use_safetensors=True)

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
        mask_id = self.pipe.scheduler.config.mask_token_id
        inputs = torch.where(mask, mask_id, tokens).reshape(x0.shape[0], *x0.shape[2:])
        micro = torch.tensor([self.width, self.height, 0, 0, 6], device=tokens.device, dtype=cond["pooled_text_emb"].dtype)
        logits = model(inputs, micro_conds=micro.expand(b, -1), **cond)  # (B, codebook, h, w)
        nll = torch.nn.functional.cross_entropy(logits.float().flatten(2), tokens, reduction="none")
        return (nll * mask).sum(1) / mask.sum(1)
