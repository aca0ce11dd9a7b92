"""The reward bank: every reward of a manifest, scoring batches of decoded images.

Images are decoded once per batch and preprocessed once per distinct preprocessing (rewards with the same
`preprocess_key` share the tensor). Inference runs under `torch.inference_mode`, with bf16 autocast on CUDA.
With `one_at_a_time`, rewards are loaded, run and released one after another, for banks that do not fit on one
accelerator together.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from pipeline.config import RewardSpec
from rewards.base import PixelReward, Reward, build_reward


class RewardBank:
    def __init__(self, specs: list[RewardSpec], device: str = "cpu", one_at_a_time: bool = False):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self.specs, self.device, self.one_at_a_time = specs, device, one_at_a_time
        self.loaded: dict[str, Reward] = {} if one_at_a_time else {s.name: self._load(s) for s in specs}

    def _load(self, spec: RewardSpec) -> Reward:
        return build_reward(spec).to(self.device)

    def _autocast(self):
        if self.device.startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def rewards(self) -> Iterator[Reward]:
        """Each reward in turn; in one-at-a-time mode it is freed once the caller moves on."""
        for spec in self.specs:
            if not self.one_at_a_time:
                yield self.loaded[spec.name]
                continue
            reward = self._load(spec)
            yield reward
            del reward
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def iter_scores(self, batches: Callable[[], Iterable[tuple[list[Any], list[str]]]]) -> Iterator[dict[str, np.ndarray]]:
        """Score every (images, prompts) batch that `batches()` yields with every reward; yields reward name ->
        scores per batch, as soon as a batch is done (so callers can write while the next batch scores).

        `batches` is called once, or once per reward in one-at-a-time mode (images are decoded lazily, one
        batch at a time); that mode yields only after the last reward has run.
        """
        if not self.one_at_a_time:
            for images, prompts in batches():
                shared: dict[str, torch.Tensor] = {}
                yield {reward.name: self._score_one(reward, images, prompts, shared) for reward in self.rewards()}
            return
        per_reward = {reward.name: [self._score_one(reward, images, prompts, {}) for images, prompts in batches()]
                      for reward in self.rewards()}
        for scores in zip(*per_reward.values()):
            yield dict(zip(per_reward, scores))

    def score_batches(self, batches: Callable[[], Iterable[tuple[list[Any], list[str]]]]) -> dict[str, np.ndarray]:
        """`iter_scores`, concatenated: reward name -> scores in batch order."""
        parts = list(self.iter_scores(batches))
        return {s.name: np.concatenate([p[s.name] for p in parts]) if parts else np.zeros(0, np.float32) for s in self.specs}

    def _score_one(self, reward: Reward, images: list[Any], prompts: list[str], shared: dict[str, torch.Tensor]) -> np.ndarray:
        with torch.inference_mode(), self._autocast():
            if isinstance(reward, PixelReward):
                key = reward.preprocess_key
                if key not in shared:
                    shared[key] = reward.preprocess(images)
                scores = reward.score_pixels(shared[key], prompts)
            else:
                scores = reward.score(images, prompts)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if len(scores) != len(images):
            raise ValueError(f"reward {reward.name} returned {len(scores)} scores for {len(images)} images")
        return scores
