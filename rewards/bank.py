"""The reward bank: every reward of a manifest, scoring batches of images.

A batch is decoded and preprocessed once per distinct preprocessing (rewards with the same `preprocess_key`
share the tensor) on `threads` CPU threads, each taking a slice of the batch (PIL releases the GIL while it
decodes and resizes), and one batch ahead: batch b+1 is prepared while batch b runs its forward passes. On
CUDA the prepared tensors are pinned and copied to the device without blocking. Preprocessing stays on the
CPU, where it is the reference implementations' own PIL code: the scores do not depend on the thread count.

Inference runs under `torch.inference_mode`, autocast to the bank's dtype ("bf16" or "fp16"); "fp32" runs
without autocast. With `one_at_a_time`, rewards are loaded, run and released one after another, for banks
that do not fit on one accelerator together.
"""

from __future__ import annotations

import contextlib
import gc
import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.config import RewardSpec
from rewards.base import PixelReward, Reward, build_reward

SCORE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
Batches = Callable[[], Iterable[tuple[list[Any], list[str]]]]


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto` is bf16 on CUDA (the throughput the rewards were served at) and fp32 on CPU (where bf16 autocast
    is slower, and where the suite checks exact parity)."""
    if dtype == "auto":
        return "bf16" if device.startswith("cuda") else "fp32"
    if dtype not in SCORE_DTYPES:
        raise ValueError(f"score dtype must be auto, {', '.join(SCORE_DTYPES)}; got {dtype!r}")
    return dtype


def decode_threads(cpus: float) -> int:
    """Threads that decode and preprocess: one per CPU the worker holds (`score.cpus_per_worker`), at least one.
    On a Ray actor these are the CPUs it reserved, so give GPU workers several (e.g. 8 on a 16-core node with
    two GPUs): the forward passes need one thread to launch kernels, the rest decode the next batch."""
    return max(1, int(cpus))


def available_cpus() -> int:
    """CPUs this process may run on (the whole machine for a driver-side stage such as eval)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class PreparedBatch:
    images: list[Any]  # decoded (plug-in rewards score these)
    prompts: list[str]
    pixels: dict[str, torch.Tensor]  # preprocess key -> (B, ...) tensor, pinned when the bank is on CUDA


class RewardBank:
    def __init__(self, specs: list[RewardSpec], device: str = "cpu", one_at_a_time: bool = False,
                 dtype: str = "auto", threads: int = 1):
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self.specs, self.device, self.one_at_a_time = specs, device, one_at_a_time
        self.dtype = resolve_dtype(dtype, device)
        self.threads = max(1, threads)
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="decode")
        self.loaded: dict[str, Reward] = {} if one_at_a_time else {s.name: self._load(s) for s in specs}

    def _load(self, spec: RewardSpec) -> Reward:
        return build_reward(spec).to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=SCORE_DTYPES[self.dtype])

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

    @staticmethod
    def _prepare_slice(images: list[Any], rewards: list[Reward]) -> dict[str, torch.Tensor]:
        """Decode a slice of a batch and run each distinct preprocessing on it (one thread per slice, so no two
        threads ever touch the same image)."""
        for im in images:
            if hasattr(im, "load"):
                im.load()
        pixels: dict[str, torch.Tensor] = {}
        for reward in rewards:
            if isinstance(reward, PixelReward) and reward.preprocess_key not in pixels:
                pixels[reward.preprocess_key] = reward.preprocess(images)
        return pixels

    def prepare(self, images: list[Any], prompts: list[str], rewards: list[Reward]) -> PreparedBatch:
        """The batch decoded and preprocessed for `rewards`, its slices spread over the decode threads."""
        step = max(1, -(-len(images) // self.threads))
        slices = [self.pool.submit(self._prepare_slice, images[lo : lo + step], rewards)
                  for lo in range(0, len(images), step)]
        parts = [s.result() for s in slices]
        pixels = {key: torch.cat([p[key] for p in parts]) for key in (parts[0] if parts else {})}
        if self.device.startswith("cuda"):
            pixels = {key: t.pin_memory() for key, t in pixels.items()}
        return PreparedBatch(images, prompts, pixels)

    def prepared(self, batches: Iterable[tuple[list[Any], list[str]]], rewards: list[Reward]) -> Iterator[PreparedBatch]:
        """`prepare` over `batches`, one batch ahead of the consumer: the next batch decodes while this one scores."""
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as ahead:
            pending = None
            for images, prompts in batches:
                following = ahead.submit(self.prepare, images, prompts, rewards)
                if pending is not None:
                    yield pending.result()
                pending = following
            if pending is not None:
                yield pending.result()

    def iter_scores(self, batches: Batches) -> Iterator[dict[str, np.ndarray]]:
        """Score every (images, prompts) batch that `batches()` yields with every reward; yields reward name ->
        scores per batch, as soon as a batch is done (so callers can write while the next batch scores).

        `batches` is called once, or once per reward in one-at-a-time mode (images are decoded lazily, one
        batch at a time); that mode yields only after the last reward has run.
        """
        if not self.one_at_a_time:
            rewards = list(self.rewards())
            for batch in self.prepared(batches(), rewards):
                on_device = self._to_device(batch)
                yield {reward.name: self._score_one(reward, on_device) for reward in rewards}
            return
        per_reward = {reward.name: [self._score_one(reward, self._to_device(b)) for b in self.prepared(batches(), [reward])]
                      for reward in self.rewards()}
        for scores in zip(*per_reward.values()):
            yield dict(zip(per_reward, scores))

    def score_batches(self, batches: Batches) -> dict[str, np.ndarray]:
        """`iter_scores`, concatenated: reward name -> scores in batch order."""
        parts = list(self.iter_scores(batches))
        return {s.name: np.concatenate([p[s.name] for p in parts]) if parts else np.zeros(0, np.float32) for s in self.specs}

    def _to_device(self, batch: PreparedBatch) -> PreparedBatch:
        pixels = {key: t.to(self.device, non_blocking=True) for key, t in batch.pixels.items()}
        return PreparedBatch(batch.images, batch.prompts, pixels)

    def _score_one(self, reward: Reward, batch: PreparedBatch) -> np.ndarray:
        with torch.inference_mode(), self._autocast():
            if isinstance(reward, PixelReward):
                scores = reward.score_pixels(batch.pixels[reward.preprocess_key], batch.prompts)
            else:
                scores = reward.score(batch.images, batch.prompts)
        scores = np.asarray(scores, dtype=np.float32).reshape(-1)
        if len(scores) != len(batch.images):
            raise ValueError(f"reward {reward.name} returned {len(scores)} scores for {len(batch.images)} images")
        return scores
