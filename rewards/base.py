"""The Reward protocol, the registry of built-in kinds, plug-in loading and safe checkpoint loading.

A reward is any object with
    name: str
    score(images: list[PIL.Image.Image], prompts: list[str]) -> np.ndarray   # one float per image
    to(device: str) -> the reward, placed on that device
Built-in rewards also expose `preprocess_key`, `preprocess(images) -> Tensor` and
`score_pixels(pixels, prompts) -> np.ndarray`, so that the bank preprocesses a batch once for every reward
that shares a key. A plug-in is named in a manifest as `kind: "package.module:ClassName"`; its constructor
receives the reward spec (`RewardSpec`).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from pipeline.config import RewardSpec
from pipeline.errors import StageError


@runtime_checkable
class Reward(Protocol):
    name: str

    def score(self, images: list[Any], prompts: list[str]) -> np.ndarray: ...

    def to(self, device: str) -> Reward: ...


class PixelReward:
    """Base of built-in rewards: preprocessing is separate from scoring so the bank can share it."""

    name: str
    preprocess_key: str
    model: torch.nn.Module
    device: str = "cpu"

    def preprocess(self, images: list[Any]) -> torch.Tensor:
        raise NotImplementedError

    def score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def score(self, images: list[Any], prompts: list[str]) -> np.ndarray:
        return self.score_pixels(self.preprocess(images), prompts)

    def modules(self) -> list[torch.nn.Module]:
        """The torch modules to place on the device: by default the reward's one `model`."""
        return [self.model]

    def to(self, device: str) -> PixelReward:
        self.device = device
        for module in self.modules():
            module.to(device).eval()
        return self


def resolve_file(ref: str, local_files_only: bool = False) -> Path:
    """A local file, or `hf://<org>/<repo>/<path/in/repo>` downloaded through the HF cache."""
    if ref.startswith("hf://"):
        from huggingface_hub import hf_hub_download

        org, repo, filename = ref.removeprefix("hf://").split("/", 2)
        try:
            return Path(hf_hub_download(f"{org}/{repo}", filename, local_files_only=local_files_only))
        except Exception as err:
            raise StageError(f"{ref}: cannot fetch the checkpoint: {err}") from None
    path = Path(ref).expanduser()
    if not path.is_file():
        raise StageError(f"{ref}: checkpoint file not found")
    return path


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """safetensors, or a torch file loaded with weights_only=True; unwraps `state_dict` and DDP's `module.`."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise StageError(f"{path}: cannot load checkpoint safely (weights only): {err}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise StageError(f"{path}: checkpoint holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, optional: tuple[str, ...] = ()) -> None:
    """Load every key and only known keys; `optional` names buffers an older checkpoint may lack."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if k not in optional]
    if missing or result.unexpected_keys:
        raise StageError(
            f"{path}: checkpoint does not match the model: missing keys {missing[:8]}"
            f"{'...' if len(missing) > 8 else ''}, unexpected keys {result.unexpected_keys[:8]}"
        )


def check_tokenizer(tokenizer: Any, ref: str) -> None:
    if len(tokenizer) < 16:  # offline loads of a hub id can yield an empty tokenizer instead of failing
        raise StageError(f"{ref}: tokenizer has only {len(tokenizer)} tokens: its files were not found (offline?)")


# kind -> "module:Class", imported on first use through the plug-in path: heavy dependencies (open_clip,
# transformers) load only for the kinds a manifest names, and base.py never imports its own subclasses.
BUILTIN_KINDS: dict[str, str] = {
    "hpsv2": "rewards.hps:HPSv2",
    "hpsv2.1": "rewards.hps:HPSv2",
    "imagereward": "rewards.image_reward:ImageReward",
    "pickscore": "rewards.clip_hf:PickScore",
    "aesthetic": "rewards.clip_hf:AestheticV2",
    "clipscore": "rewards.clip_hf:ClipScore",
}


def build_reward(spec: RewardSpec) -> Reward:
    """Instantiate a built-in kind or a `module:Class` plug-in, checking it implements the protocol."""
    target = BUILTIN_KINDS.get(spec.kind, spec.kind)
    if ":" not in target:
        raise StageError(
            f"score.rewards.{spec.name}: unknown kind '{spec.kind}'; built-in kinds: {', '.join(BUILTIN_KINDS)}, "
            "or a plug-in as 'module:Class'"
        )
    module_name, _, cls_name = target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as err:
        what = f"plug-in '{target}'" if target == spec.kind else f"built-in kind '{spec.kind}' ({target})"
        raise StageError(f"score.rewards.{spec.name}: cannot import {what}: {err}") from None
    reward = cls(spec)
    if not isinstance(reward, Reward):
        raise StageError(f"score.rewards.{spec.name}: {spec.kind} does not implement the Reward protocol (name, score, to)")
    reward.name = spec.name
    return reward
