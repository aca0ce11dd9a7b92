"""TGO: threshold-guided binary classification of samples by their implicit score.

    log pi(y|x) ~ -e / T                                (T: temperature, default 0.001)
    s_hat = beta * (log pi_theta - log pi_ref) = beta * (e_ref - e_theta) / T
    L = mean_i  -w_i * [ l_i * log sigmoid(s_hat_i) + (1 - l_i) * log sigmoid(-s_hat_i) ]

with labels l = 1[s >= tau] and weights w = 1 + c * |s - tau| from the threshold stage. At initialisation
(policy == reference) s_hat = 0 and L = mean(w) * ln 2.
"""

from __future__ import annotations

import torch
from torch.nn.functional import logsigmoid


def tgo_loss(e_policy: torch.Tensor, e_ref: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
             beta: float, temperature: float) -> tuple[torch.Tensor, dict[str, float]]:
    s_hat = beta * (e_ref - e_policy) / temperature
    labels = labels.to(s_hat.dtype)
    loss = -(weights * (labels * logsigmoid(s_hat) + (1 - labels) * logsigmoid(-s_hat))).mean()
    with torch.no_grad():
        pos, neg = labels > 0.5, labels <= 0.5
        metrics = {
            "implicit_acc": ((s_hat > 0) == pos).float().mean().item(),
            "score_pos": s_hat[pos].mean().item() if pos.any() else float("nan"),
            "score_neg": s_hat[neg].mean().item() if neg.any() else float("nan"),
        }
    return loss, metrics
