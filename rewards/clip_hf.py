"""Rewards on a Hugging Face `CLIPModel`: PickScore v1, CLIPScore and the LAION aesthetic predictor v2.

- PickScore: logit_scale.exp() * cosine(image, prompt), with the processor of `options.processor` (PickScore
  v1 uses the CLIP-ViT-H-14-laion2B processor) or of the model itself.
- CLIPScore: 100 * cosine; `options.variant: paper` gives the paper's 2.5 * max(cosine, 0).
- LAION aesthetic v2: the L2-normalised CLIP ViT-L/14 image embedding into the MLP 768-1024-128-64-16-1
  (no activations, as trained), loaded strictly from `checkpoint` (sac+logos+ava1-l14-linearMSE.pth).
Images are preprocessed by the model's own image processor (PIL backend, as the references ran).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.config import RewardSpec
from pipeline.errors import StageError
from rewards.base import PixelReward, check_tokenizer, load_state_dict, load_strict, resolve_file


def _features(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.pooler_output


class HFClip(PixelReward):
    """A CLIPModel with its image processor and tokenizer, loaded with `from_pretrained`."""

    default_model: str = "openai/clip-vit-large-patch14"

    def __init__(self, spec: RewardSpec):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        self.name = spec.name
        model_ref = spec.model or self.default_model
        processor_ref = spec.options.get("processor", model_ref)
        try:
            self.model = CLIPModel.from_pretrained(model_ref, local_files_only=spec.local_files_only)
            self.processor = AutoImageProcessor.from_pretrained(processor_ref, backend="pil", local_files_only=spec.local_files_only)
            self.tokenizer = AutoTokenizer.from_pretrained(spec.tokenizer or processor_ref, local_files_only=spec.local_files_only)
        except OSError as err:
            raise StageError(f"score.rewards.{spec.name}: cannot load {model_ref}: {err}") from None
        check_tokenizer(self.tokenizer, spec.tokenizer or processor_ref)
        self.preprocess_key = f"hf-processor:{processor_ref}"

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        return self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))

    def cosine(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        text = self.tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        t = _features(self.model.get_text_features(**text))
        i = self.image_features(pixels)
        return (nn.functional.normalize(i, dim=-1) * nn.functional.normalize(t, dim=-1)).sum(-1)


class PickScore(HFClip):
    default_model = "yuvalkirstain/PickScore_v1"

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
        return (self.model.logit_scale.exp() * self.cosine(pixels, prompts)).float().cpu().numpy()


class ClipScore(HFClip):
    def __init__(self, spec: RewardSpec):
        super().__init__(spec)
        self.variant = spec.options.get("variant", "x100")
        if self.variant not in ("x100", "paper"):
            raise StageError(f"score.rewards.{spec.name}.options.variant: 'x100' or 'paper', got {self.variant!r}")

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
        cos = self.cosine(pixels, prompts)
        out = 100 * cos if self.variant == "x100" else 2.5 * cos.clamp(min=0)
        return out.float().cpu().numpy()


class AestheticMLP(nn.Module):
    """768-1024-128-64-16-1 with dropouts and no activations: key names `layers.{0,2,4,6,7}`."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AestheticV2(HFClip):
    def __init__(self, spec: RewardSpec):
        super().__init__(spec)
        if spec.checkpoint is None:
            raise StageError(f"score.rewards.{spec.name}: the aesthetic predictor needs `checkpoint` (its MLP .pth)")
        self.head = AestheticMLP(self.model.config.projection_dim)
        path = resolve_file(spec.checkpoint, spec.local_files_only)
        load_strict(self.head, load_state_dict(path), path)

    def modules(self) -> list[nn.Module]:
        return [self.model, self.head]

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
        embedding = nn.functional.normalize(self.image_features(pixels).float(), dim=-1)
        return self.head(embedding).squeeze(-1).float().cpu().numpy()
