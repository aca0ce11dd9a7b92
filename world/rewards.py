"""Digit-classifier rewards of the embedded demo world: reward = P(the prompted digit | image).

Two differently built classifiers are trained on disjoint halves of scikit-learn's handwritten digits: an MLP
(the training reward) and a small CNN (held out, for evaluation only). A classifier is saved as a directory
with `config.json` ({"arch": "mlp" | "cnn", "image_size": 16}) and `model.safetensors`; the reward spec's
`checkpoint` names that directory. The prompted digit is the first numeral or number word in the prompt.
A manifest names this reward as a plug-in: `kind: "world.rewards:DigitReward"`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config import RewardSpec
from pipeline.errors import StageError
from rewards.base import PixelReward, load_state_dict, load_strict

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
_DIGIT = re.compile(r"\b(" + "|".join([*WORDS, *map(str, range(10))]) + r")\b", re.IGNORECASE)


def prompted_digit(prompt: str) -> int:
    match = _DIGIT.search(prompt)
    if match is None:
        raise StageError(f"prompt {prompt!r} names no digit")
    token = match.group(1).lower()
    return int(token) if token.isdigit() else WORDS.index(token)


class DigitMLP(nn.Module):
    def __init__(self, size: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(size * size, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitCNN(nn.Module):
    def __init__(self, size: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.head = nn.Linear(32 * (size // 4) ** 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.head(x.flatten(1))


ARCHS = {"mlp": DigitMLP, "cnn": DigitCNN}


def save_classifier(model: nn.Module, arch: str, size: int, directory: Path) -> Path:
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"arch": arch, "image_size": size}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def to_gray_tensor(images: list[Any], size: int) -> torch.Tensor:
    """PIL images -> (B, 1, size, size) in [0, 1] (bilinear resize when the size differs)."""
    out = []
    for im in images:
        im = im.convert("L")
        if im.size != (size, size):
            im = im.resize((size, size), resample=2)
        out.append(torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0))
    return torch.stack(out)[:, None]


class DigitReward(PixelReward):
    def __init__(self, spec: RewardSpec):
        self.name = spec.name
        if spec.checkpoint is None:
            raise StageError(f"score.rewards.{spec.name}: the digit reward needs `checkpoint` (a classifier dir)")
        directory = Path(spec.checkpoint)
        try:
            config = json.loads((directory / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise StageError(f"{directory / 'config.json'}: cannot read the classifier config ({err})") from None
        self.size = int(config["image_size"])
        self.model = ARCHS[config["arch"]](self.size)
        path = directory / "model.safetensors"
        load_strict(self.model, load_state_dict(path), path)
        self.preprocess_key = f"gray-{self.size}"

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        return to_gray_tensor(images, self.size)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
        probs = self.model(pixels.to(self.device).float()).softmax(-1)
        targets = torch.tensor([prompted_digit(p) for p in prompts], device=probs.device)
        return probs.gather(1, targets[:, None]).squeeze(1).float().cpu().numpy()
