"""Diffusion-KTO (Li et al.), the reference formulation with the sigmoid value function.

    g_i  = beta * (e_ref_i - e_theta_i)                 implicit reward (log-ratio, up to T)
    z    = clamp(mean_i (e_ref_i - e_theta_i), min=0)   batch reference point (no gradient)
    h_i  = sigmoid( sign_i * beta * ((e_ref_i - e_theta_i) - z) ),  sign = +1 desirable, -1 undesirable
    L    = mean_i  lambda_{y_i} * (1 - h_i)             lambda_D, lambda_U: desirable / undesirable weights

At initialisation L = mean(lambda) / 2. Desirable samples are those labelled 1 by the threshold stage.
"""

from __future__ import annotations

import torch


def kto_loss(e_policy: torch.Tensor, e_ref: torch.Tensor, labels: torch.Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
             reference_point: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """`reference_point` overrides z (the training loop passes the mean over all processes)."""
    g = e_ref - e_policy
    z = (g.mean() if reference_point is None else reference_point).detach().clamp(min=0)
    desirable = labels > 0.5
    sign = desirable.to(g.dtype) * 2 - 1
    h = torch.sigmoid(sign * beta * (g - z))
    lam = torch.where(desirable, desirable_weight, undesirable_weight).to(g.dtype)
    loss = (lam * (1 - h)).mean()
    with torch.no_grad():
        metrics = {
            "implicit_acc": (sign * (g - z) > 0).float().mean().item(),
            "score_pos": (beta * g[desirable]).mean().item() if desirable.any() else float("nan"),
            "score_neg": (beta * g[~desirable]).mean().item() if (~desirable).any() else float("nan"),
            "kto_z": z.item(),
        }
    return loss, metrics
