"""ImageReward v1.0, implemented on timm and torch so that it runs on a current stack.

Architecture (as in THUDM/ImageReward, from BLIP): a ViT-L/16 image encoder (timm VisionTransformer, same
parameter names), a BERT text encoder whose every layer also cross-attends to the image tokens (keys/values
projected from the image width), and an MLP 768-1024-128-64-16-1 on the [CLS] output. Score:
    (mlp(text_encoder(prompt, image)[:, 0]) - 0.16717362830052426) / 1.0333394966054072
with the prompt padded/truncated to 35 BERT tokens and the image resized (shortest side 224, bicubic),
centre-cropped and normalised with the CLIP mean/std. `checkpoint` is ImageReward.pt and `options.med_config`
its med_config.json; the BERT tokenizer comes from `tokenizer` (default bert-base-uncased). Loading is
strict: only the position-id buffer may be absent.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import RewardSpec
from pipeline.errors import StageError
from rewards.base import PixelReward, check_tokenizer, load_state_dict, load_strict, resolve_file
from rewards.clip_hf import AestheticMLP
from rewards.preprocess import resize_center_crop

MEAN, STD = 0.16717362830052426, 1.0333394966054072
MAX_TOKENS = 35
VIT_PRESETS = {
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16, "patch_size": 16, "image_size": 224},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16, "image_size": 224},
}


class Attention(nn.Module):
    """BERT attention block; as cross-attention, keys and values come from `kv_width`-wide image tokens."""

    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = nn.Module()
        self.self.query = nn.Linear(hidden, hidden)
        self.self.key = nn.Linear(kv_width, hidden)
        self.self.value = nn.Linear(kv_width, hidden)
        self.output = nn.Module()
        self.output.dense = nn.Linear(hidden, hidden)
        self.output.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self._split(self.self.query(x)), self._split(self.self.key(context)), self._split(self.self.value(context))
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(x.shape)
        return self.output.LayerNorm(self.output.dense(attn) + x)


class TextLayer(nn.Module):
    def __init__(self, cfg: Any, image_width: int):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.layer_norm_eps
        self.attention = Attention(h, cfg.num_attention_heads, h, eps)
        self.crossattention = Attention(h, cfg.num_attention_heads, image_width, eps)
        self.intermediate = nn.Module()
        self.intermediate.dense = nn.Linear(h, cfg.intermediate_size)
        self.output = nn.Module()
        self.output.dense = nn.Linear(cfg.intermediate_size, h)
        self.output.LayerNorm = nn.LayerNorm(h, eps=eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image, None)  # every image token is attended to
        return self.output.LayerNorm(self.output.dense(F.gelu(self.intermediate.dense(x))) + x)


class MultimodalBert(nn.Module):
    """BLIP's text encoder in multimodal mode: word + absolute position embeddings, no token types."""

    def __init__(self, cfg: Any, image_width: int):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.embeddings.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.embeddings.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embeddings.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings).expand((1, -1)))
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(TextLayer(cfg, image_width) for _ in range(cfg.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        emb = self.embeddings
        positions = emb.position_ids[:, : input_ids.shape[1]]
        x = emb.LayerNorm(emb.word_embeddings(input_ids) + emb.position_embeddings(positions))
        mask = ((1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0)
        for layer in self.encoder.layer:
            x = layer(x, mask, image)
        return x


class ImageRewardModel(nn.Module):
    def __init__(self, med_config: Any, vit: dict[str, int], embed_dim: int = 256):
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.blip = nn.Module()
        self.blip.visual_encoder = VisionTransformer(
            img_size=vit["image_size"], patch_size=vit["patch_size"], embed_dim=vit["embed_dim"], depth=vit["depth"],
            num_heads=vit["num_heads"], num_classes=0, global_pool="", qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.blip.text_encoder = MultimodalBert(med_config, vit["embed_dim"])
        self.blip.vision_proj = nn.Linear(vit["embed_dim"], embed_dim)  # unused by the score, kept for strict loading
        self.blip.text_proj = nn.Linear(med_config.hidden_size, embed_dim)
        self.mlp = AestheticMLP(med_config.hidden_size)  # same 768-1024-128-64-16-1 head layout

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.blip.visual_encoder.forward_features(pixels)
        text = self.blip.text_encoder(input_ids, attention_mask, image)
        return (self.mlp(text[:, 0].float()).squeeze(-1) - MEAN) / STD


class ImageReward(PixelReward):
    def __init__(self, spec: RewardSpec):
        from transformers import BertConfig, BertTokenizer

        self.name = spec.name
        if spec.checkpoint is None or "med_config" not in spec.options:
            raise StageError(f"score.rewards.{spec.name}: ImageReward needs `checkpoint` and `options.med_config`")
        med_path = Path(spec.options["med_config"])
        if not med_path.is_file():
            raise StageError(f"score.rewards.{spec.name}.options.med_config: no such file {med_path}")
        med = BertConfig.from_json_file(str(med_path))
        vit = spec.options.get("vit", "large")
        vit = VIT_PRESETS[vit] if isinstance(vit, str) else dict(vit)
        tokenizer_ref = spec.tokenizer or "bert-base-uncased"
        try:
            self.tokenizer = BertTokenizer.from_pretrained(tokenizer_ref, local_files_only=spec.local_files_only)
        except OSError as err:
            raise StageError(f"score.rewards.{spec.name}: cannot load tokenizer {tokenizer_ref}: {err}") from None
        check_tokenizer(self.tokenizer, tokenizer_ref)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})  # as BLIP
        self.model = ImageRewardModel(med, vit)
        path = resolve_file(spec.checkpoint, spec.local_files_only)
        load_strict(self.model, load_state_dict(path), path, optional=("blip.text_encoder.embeddings.position_ids",))
        self.size = vit["image_size"]
        self.preprocess_key = f"center-crop-{self.size}"

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        return resize_center_crop(images, self.size)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
        text = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
        out = self.model(pixels.to(self.device), text["input_ids"].to(self.device), text["attention_mask"].to(self.device))
        return out.float().cpu().numpy()
