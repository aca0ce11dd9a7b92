"""Image preprocessing of the reference implementations, on PIL images, as (B, 3, S, S) float tensors."""

from __future__ import annotations

from typing import Any

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def _normalize(images: list[torch.Tensor], mean, std) -> torch.Tensor:
    return F.normalize(torch.stack(images), mean, std)


def letterbox(images: list[Any], size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """HPS: resize the longest side to `size` (bicubic), zero-pad to a centred square, then normalise."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / max(w, h)
        new_w, new_h = round(w * scale), round(h * scale)
        im = F.resize(im, [new_h, new_w], interpolation=InterpolationMode.BICUBIC)
        pad_w, pad_h = size - new_w, size - new_h
        im = F.pad(im, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        out.append(F.to_tensor(im))
    return _normalize(out, mean, std)


def resize_center_crop(images: list[Any], size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """CLIP/BLIP: resize the shortest side to `size` (bicubic), centre-crop a square, then normalise."""
    out = []
    for im in images:
        im = F.resize(im.convert("RGB"), size, interpolation=InterpolationMode.BICUBIC)
        out.append(F.to_tensor(F.center_crop(im, [size, size])))
    return _normalize(out, mean, std)
