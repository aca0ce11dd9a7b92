"""Diffusion-DPO (Wallace et al.): pairs noised with the same fresh noise and timestep.

    L = mean  -log sigmoid( -0.5 * beta * [ (e_w - e_l) - (e_w_ref - e_l_ref) ] )

beta is about 5000 for SD1.5/SDXL and about 2000 for flow models. At initialisation L = ln 2.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.functional import logsigmoid

from trainer.methods.base import LossContext, Method, Metrics


class DPO(Method):
    name = "dpo"
    data = "pairs"
    row_columns = ("prompt",)

    def loss(self, e: torch.Tensor, e_ref: torch.Tensor, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        """e, e_ref: (2B,) laid out [winners; losers]."""
        half = len(e) // 2
        e_w, e_l, e_w_ref, e_l_ref = e[:half], e[half:], e_ref[:half], e_ref[half:]
        inside = -0.5 * ctx.beta * ((e_w - e_l) - (e_w_ref - e_l_ref))
        loss = -logsigmoid(inside).mean()
        return loss, {**pair_metrics(inside, e_w, e_l, e_w_ref, e_l_ref), "beta_t": ctx.beta}


def pair_metrics(inside: torch.Tensor, e_w, e_l, e_w_ref, e_l_ref) -> Metrics:
    """Implicit accuracy (the pair loss's argument > 0) and the implicit log-ratios of winners and losers."""
    with torch.no_grad():
        return {
            "implicit_acc": (inside > 0).float().mean(),
            "score_winner": (e_w_ref - e_w).mean(),  # implicit log-ratio, up to the scale beta
            "score_loser": (e_l_ref - e_l).mean(),
        }
