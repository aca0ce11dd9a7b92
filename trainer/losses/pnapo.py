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

import torch
from torch.nn.functional import logsigmoid

from trainer.losses.dpo import pair_metrics


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


def pnapo_loss(e_w: torch.Tensor, e_l: torch.Tensor, e_w_ref: torch.Tensor, e_l_ref: torch.Tensor,
               beta_t: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    inside = -beta_t * ((e_w - e_l) - (e_w_ref - e_l_ref))
    loss = -logsigmoid(inside).mean()
    return loss, {**pair_metrics(inside, e_w, e_l, e_w_ref, e_l_ref), "beta_t": beta_t.float().mean().item()}
