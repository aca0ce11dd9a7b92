"""HPSv2 / HPSv2.1: an open_clip ViT-H-14 fine-tuned on human preferences.

The architecture is built with `pretrained=None` and the HPS checkpoint (`HPS_v2_compressed.pt` /
`HPS_v2.1_compressed.pt`, weights under `state_dict`) is loaded strictly. Preprocessing letterboxes: the
longest side is resized to 224 and the image zero-padded to a square. The score is the cosine of the
normalised image and text features, stored as is (about 0.2-0.35), not x100 unless `options.scale: 100`.

Options: `arch` (default ViT-H-14), `arch_config` (a JSON model config to register with open_clip, for
custom or test architectures; its file stem becomes the arch name), `scale`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import RewardSpec
from pipeline.errors import StageError
from rewards.base import PixelReward, load_state_dict, load_strict, resolve_file
from rewards.preprocess import letterbox


class HPSv2(PixelReward):
    def __init__(self, spec: RewardSpec):
        import open_clip

        self.name = spec.name
        arch = spec.options.get("arch", "ViT-H-14")
        if "arch_config" in spec.options:
            config = Path(spec.options["arch_config"])
            if not config.is_file():
                raise StageError(f"score.rewards.{spec.name}.options.arch_config: no such file {config}")
            open_clip.add_model_config(config)
            arch = config.stem
        if spec.checkpoint is None:
            raise StageError(f"score.rewards.{spec.name}: HPS needs `checkpoint` (HPS_v2.1_compressed.pt)")
        self.model = open_clip.create_model(arch, pretrained=None)
        path = resolve_file(spec.checkpoint, spec.local_files_only)
        load_strict(self.model, load_state_dict(path), path)
        self.tokenizer = open_clip.get_tokenizer(arch)
        self.size = self.model.visual.image_size
        self.size = self.size[0] if isinstance(self.size, tuple | list) else self.size
        self.scale = float(spec.options.get("scale", 1.0))
        self.preprocess_key = f"letterbox-{self.size}"

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        return letterbox(images, self.size)

    @torch.inference_mode()
    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
        image = self.model.encode_image(pixels.to(self.device), normalize=True)
        text = self.model.encode_text(self.tokenizer(prompts).to(self.device), normalize=True)
        return (self.scale * (image * text).sum(-1)).float().cpu().numpy()
