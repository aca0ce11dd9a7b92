"""Diffusion-DPO (Wallace et al.): pairs noised with the same fresh noise and timestep.

    L = mean  -log sigmoid( -0.5 * beta * [ (e_w - e_l) - (e_w_ref - e_l_ref) ] )

beta is about 5000 for SD1.5/SDXL and about 2000 for flow models. At initialisation L = ln 2.
"""

from __future__ import annotations

import torch
from torch.nn.functional import logsigmoid


def dpo_loss(e_w: torch.Tensor, e_l: torch.Tensor, e_w_ref: torch.Tensor, e_l_ref: torch.Tensor,
             beta: float | torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    inside = -0.5 * beta * ((e_w - e_l) - (e_w_ref - e_l_ref))
    loss = -logsigmoid(inside).mean()
    return loss, pair_metrics(inside, e_w, e_l, e_w_ref, e_l_ref)


def pair_metrics(inside: torch.Tensor, e_w, e_l, e_w_ref, e_l_ref) -> dict[str, float]:
    with torch.no_grad():
        return {
            "implicit_acc": (inside > 0).float().mean().item(),
            "score_winner": (e_w_ref - e_w).mean().item(),  # implicit log-ratio, up to the scale beta
            "score_loser": (e_l_ref - e_l).mean().item(),
        }
