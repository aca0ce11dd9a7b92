"""What a training method declares to the training loop, and the one signature of every loss.

A method is a stateless object in the registry (trainer/methods/__init__.py). The loop asks it which data it
reads, whether it needs a frozen reference or the recorded prior noise, its defaults, and its loss; everything
a loss needs beyond the errors and the batch comes in a LossContext resolved once per run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from pipeline.config import TrainSection
    from pipeline.shards import Dataset


class Options(BaseModel):
    """A method's own keys under `train:` in a manifest (none by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Sample:
    """The columns of one sample of a dataset row."""

    id: str
    image: str
    latent: str  # the sampler's final latent, exact where re-encoding the image is not
    noise: str  # the recorded prior noise


LABELED = (Sample("sample_id", "image", "latent", "noise"),)
PAIRS = (Sample("winner_id", "winner_image", "winner_latent", "winner_noise"),
         Sample("loser_id", "loser_image", "loser_latent", "loser_noise"))


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class MaskedMean:
    """mean(values[mask]), nan where the mask selects nothing, read only when a step is logged: selecting by a
    mask makes the host wait for the device, so it is not done every step."""

    values: torch.Tensor
    mask: torch.Tensor

    def item(self) -> float:
        return self.values[self.mask].mean().item() if self.mask.any() else float("nan")


# A loss's metrics: detached scalar tensors, masked means or plain floats, turned into floats on logged steps only
# (reading a tensor's value every step would make the host wait for the device every step).
Metrics = dict[str, torch.Tensor | MaskedMean | float]


@dataclass(frozen=True, kw_only=True)
class LossContext:
    """What a loss reads besides the errors and the batch."""

    beta: float  # beta_0: train.beta, or the method's default for the model family
    options: Options  # the method's own options
    progress: float = 0.0  # step / max_steps, in [0, 1]
    reduce: Callable[[torch.Tensor], torch.Tensor] = _same  # the mean over all training processes


class Method:
    """One training method. Subclasses set the class attributes and write `loss`."""

    name: ClassVar[str]
    data: ClassVar[Literal["labeled", "pairs"]]  # the dataset kind it trains on
    row_columns: ClassVar[tuple[str, ...]]  # what it reads of a row besides each sample's id and latent (or image)
    options: ClassVar[type[Options]] = Options
    needs_reference: ClassVar[bool] = True  # False: no frozen reference, e_ref = e.detach()
    needs_recorded_noise: ClassVar[bool] = False  # True: samples are noised with their recorded prior noise
    logit_mean: ClassVar[float] = 0.0  # default train.logit_mean (where sigmas are drawn, rectified flow)

    @property
    def samples(self) -> tuple[Sample, ...]:
        """The samples of a row; errors of a pair are laid out [winners; losers]."""
        return PAIRS if self.data == "pairs" else LABELED

    def default_beta(self, family: str) -> float:
        """beta_0 when train.beta is not set: the Diffusion-DPO scale, smaller for rectified flow."""
        return 2000.0 if family == "rectified_flow" else 5000.0

    def columns(self, available: set[str]) -> list[str]:
        """The columns to read: a sample's image only where its recorded latent is absent (no PNG decoding)."""
        cols = list(self.row_columns)
        for s in self.samples:
            cols += [s.id, s.latent if s.latent in available else s.image]
            cols += [s.noise] if self.needs_recorded_noise else []
        return cols

    def noise(self, ctx: LossContext) -> Literal["recorded", "shared", "independent"]:
        """Where the noisy inputs' noise comes from: each sample's recorded prior noise, fresh noise shared by
        the samples of a row, or fresh noise of its own for each sample."""
        return "recorded" if self.needs_recorded_noise else "shared"

    def check_data(self, path: Path, dataset: Dataset) -> None:
        """Refuse a dataset this method cannot train on, before any model is loaded."""

    def context(self, cfg: TrainSection, family: str, stats: dict[str, Any]) -> LossContext:
        """The run's loss context from the train section, the model family and the dataset's statistics."""
        options = self.options.model_validate({k: getattr(cfg, k) for k in self.options.model_fields})
        return LossContext(beta=cfg.beta or self.default_beta(family), options=options)

    def loss(self, e: torch.Tensor, e_ref: torch.Tensor, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        """(loss, metrics) from the policy's and the reference's per-sample denoising errors on the same noisy
        inputs, e and e_ref: (N,), with N = B samples or 2B (pairs: [winners; losers])."""
        raise NotImplementedError
