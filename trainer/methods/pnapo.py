"""PNAPO: DPO on rectified flow with each sample noised by its *recorded* prior noise, and a dynamic beta.

For a pair (w, l) and one sigma shared by both samples and by policy and reference:
    x_t = (1 - sigma) * x0 + sigma * eps_recorded,      e = ||v_pred - (eps_recorded - x0)||^2
    L = mean  -log sigmoid( -beta_t * [ (e_w - e_l) - (e_w_ref - e_l_ref) ] )

Dynamic beta (each factor can be switched off; both off gives a static beta = beta_0):
    beta_t = beta_0 * g(gap) * h(progress)
    g(gap)   = (1 + a) / (1 + a * gap / gap_ref)     a = gap_strength; gap_ref = the pairs' median gap.
               g = 1 for a median pair, larger for small gaps (near ties: stay close to the reference), smaller
               for large gaps (a clear preference may pull further from the reference).
    h(p)     = h0 + (1 - h0) * min(1, p / ramp)      p = step / max_steps in [0, 1]: weaker regularisation
               early in training, full strength once p >= ramp.

Sigmas are noise-heavy by default (logit-normal with mean 2.0, median sigma 0.88; train.logit_mean). At high sigma
x_t is mostly the recorded noise, so the velocity there decides which image that noise becomes, and the pair loss
moves that decision from the loser towards the winner. At low sigma x_t is mostly the image: the loser term then
only unlearns the denoising of loser images. On the demo world PNAPO lost reward at mean 0 and gains at 2.0 (README).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch.nn.functional import logsigmoid

from pipeline.errors import StageError
from trainer.methods.base import LossContext, Method, Metrics, Options
from trainer.methods.dpo import pair_metrics

if TYPE_CHECKING:
    from pipeline.config import TrainSection
    from pipeline.shards import Dataset


class DynamicBetaSpec(BaseModel):
    """train.dynamic_beta: which factors of beta_t are on, and their shape."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gap: bool = True
    schedule: bool = True
    gap_strength: float = Field(1.0, ge=0)
    start: float = Field(0.5, gt=0, le=1)
    ramp: float = Field(0.5, gt=0, le=1)


class PNAPOOptions(Options):
    dynamic_beta: DynamicBetaSpec = Field(default_factory=DynamicBetaSpec)
    # "fresh": the same loss with each sample of a pair noised by its own fresh, independent noise instead of its
    # recorded one (the paper's falsification test; unlike DPO, whose fresh noise is shared within a pair)
    noise: Literal["recorded", "fresh"] = "recorded"


@dataclass(frozen=True)
class DynamicBeta:
    beta0: float
    gap_ref: float = 1.0
    use_gap: bool = True
    use_schedule: bool = True
    gap_strength: float = 1.0
    start: float = 0.5
    ramp: float = 0.5

    def __call__(self, gap: torch.Tensor, progress: float) -> torch.Tensor:
        beta = torch.full_like(gap, self.beta0, dtype=torch.float32)
        if self.use_gap:
            a = self.gap_strength
            beta = beta * (1 + a) / (1 + a * gap.float() / self.gap_ref)
        if self.use_schedule:
            beta = beta * (self.start + (1 - self.start) * min(1.0, progress / self.ramp))
        return beta


@dataclass(frozen=True, kw_only=True)
class PNAPOContext(LossContext):
    dynamic: DynamicBeta


class PNAPO(Method):
    name = "pnapo"
    data = "pairs"
    row_columns = ("prompt", "gap")
    options = PNAPOOptions
    needs_recorded_noise = True
    logit_mean = 2.0

    def noise(self, ctx: PNAPOContext) -> Literal["recorded", "independent"]:
        return "recorded" if ctx.options.noise == "recorded" else "independent"

    def check_data(self, path: Path, dataset: Dataset) -> None:
        if "winner_noise" not in dataset.features:
            raise StageError(f"{path}: PNAPO needs both samples' recorded prior noise and these pairs have none "
                             "(an external import, or a MaskGIT model, which records seeds only); use method 'dpo' for noise-free pairs")

    def context(self, cfg: TrainSection, family: str, stats: dict[str, Any]) -> PNAPOContext:
        """Adds the dynamic beta, scaled to the pairs' median reward gap."""
        base = super().context(cfg, family, stats)
        d = base.options.dynamic_beta
        gap_ref = stats.get("gap_quantiles", {}).get("p50") or 1.0
        dynamic = DynamicBeta(base.beta, gap_ref, d.gap, d.schedule, d.gap_strength, d.start, d.ramp)
        return PNAPOContext(beta=base.beta, options=base.options, dynamic=dynamic)

    def loss(self, e: torch.Tensor, e_ref: torch.Tensor, batch: dict[str, Any],
             ctx: PNAPOContext) -> tuple[torch.Tensor, Metrics]:
        """e, e_ref: (2B,) laid out [winners; losers]; batch["gap"]: (B,) reward gaps."""
        half = len(e) // 2
        e_w, e_l, e_w_ref, e_l_ref = e[:half], e[half:], e_ref[:half], e_ref[half:]
        beta_t = ctx.dynamic(batch["gap"].to(e.device), ctx.progress)
        inside = -beta_t * ((e_w - e_l) - (e_w_ref - e_l_ref))
        loss = -logsigmoid(inside).mean()
        return loss, {**pair_metrics(inside, e_w, e_l, e_w_ref, e_l_ref), "beta_t": beta_t.float().mean()}
