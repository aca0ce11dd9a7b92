"""TGO: threshold-guided binary classification of samples by their implicit score.

    log pi(y|x) ~ -e / T                                (T: temperature, default 0.001)
    s_hat = beta * (log pi_theta - log pi_ref) = beta * (e_ref - e_theta) / T
    L = mean_i  -w_i * [ l_i * log sigmoid(s_hat_i) + (1 - l_i) * log sigmoid(-s_hat_i) ]

with labels l = 1[s >= tau] and weights w = 1 + c * |s - tau| from the threshold stage. At initialisation
(policy == reference) s_hat = 0 and L = mean(w) * ln 2.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch.nn.functional import logsigmoid

from trainer.methods.base import LossContext, MaskedMean, Method, Metrics, Options


class TGOOptions(Options):
    temperature: float = Field(0.001, gt=0)


class TGO(Method):
    name = "tgo"
    data = "labeled"
    row_columns = ("prompt", "label", "weight")
    options = TGOOptions

    def default_beta(self, family: str) -> float:
        return 1.0

    def loss(self, e: torch.Tensor, e_ref: torch.Tensor, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        """e, e_ref: (B,); batch["label"], batch["weight"]: (B,)."""
        labels, weights = batch["label"].to(e.device), batch["weight"].to(e.device)
        s_hat = ctx.beta * (e_ref - e) / ctx.options.temperature
        labels = labels.to(s_hat.dtype)
        loss = -(weights * (labels * logsigmoid(s_hat) + (1 - labels) * logsigmoid(-s_hat))).mean()
        with torch.no_grad():
            pos, neg = labels > 0.5, labels <= 0.5
            metrics = {
                "implicit_acc": ((s_hat > 0) == pos).float().mean(),
                "score_pos": MaskedMean(s_hat.detach(), pos),
                "score_neg": MaskedMean(s_hat.detach(), neg),
                "beta_t": ctx.beta,
            }
        return loss, metrics
