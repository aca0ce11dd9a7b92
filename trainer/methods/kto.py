"""Diffusion-KTO (Li et al.), the reference formulation with the sigmoid value function.

    g_i  = beta * (e_ref_i - e_theta_i)                 implicit reward (log-ratio, up to T)
    z    = clamp(mean_i (e_ref_i - e_theta_i), min=0)   batch reference point (no gradient), mean over all processes
    h_i  = sigmoid( sign_i * beta * ((e_ref_i - e_theta_i) - z) ),  sign = +1 desirable, -1 undesirable
    L    = mean_i  lambda_{y_i} * (1 - h_i)             lambda_D, lambda_U: desirable / undesirable weights

At initialisation L = mean(lambda) / 2. Desirable samples are those labelled 1 by the threshold stage.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from trainer.methods.base import LossContext, MaskedMean, Method, Metrics, Options


class KTOOptions(Options):
    kto_desirable_weight: float = Field(1.0, gt=0)
    kto_undesirable_weight: float = Field(1.0, gt=0)


class KTO(Method):
    name = "kto"
    data = "labeled"
    row_columns = ("prompt", "label")
    options = KTOOptions

    def loss(self, e: torch.Tensor, e_ref: torch.Tensor, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        """e, e_ref: (B,); batch["label"]: (B,)."""
        labels, beta = batch["label"].to(e.device), ctx.beta
        g = e_ref - e
        z = ctx.reduce(g.mean().detach()).detach().clamp(min=0)
        desirable = labels > 0.5
        sign = desirable.to(g.dtype) * 2 - 1
        h = torch.sigmoid(sign * beta * (g - z))
        lam = torch.where(desirable, ctx.options.kto_desirable_weight, ctx.options.kto_undesirable_weight).to(g.dtype)
        loss = (lam * (1 - h)).mean()
        with torch.no_grad():
            metrics = {
                "implicit_acc": (sign * (g - z) > 0).float().mean(),
                "score_pos": MaskedMean(beta * g, desirable),
                "score_neg": MaskedMean(beta * g, ~desirable),
                "kto_z": z,
                "beta_t": beta,
            }
        return loss, metrics
