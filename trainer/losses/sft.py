"""SFT on pseudo-positives: the plain denoising loss on samples labelled 1, ignoring the others.

    L = sum_i l_i * e_theta_i / max(1, sum_i l_i)
"""

from __future__ import annotations

import torch


def sft_loss(e_policy: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    pos = (labels > 0.5).to(e_policy.dtype)
    loss = (pos * e_policy).sum() / pos.sum().clamp(min=1)
    return loss, {"positives": pos.sum().item()}
