"""SFT on pseudo-positives: the plain denoising loss on samples labelled 1, ignoring the others.

    L = sum_i l_i * e_theta_i / max(1, sum_i l_i)

No reference is needed: the loop passes e_ref = e.detach().
"""

from __future__ import annotations

from typing import Any

import torch

from trainer.methods.base import LossContext, Method, Metrics


class SFT(Method):
    name = "sft"
    data = "labeled"
    row_columns = ("prompt", "label")
    needs_reference = False

    def loss(self, e: torch.Tensor, e_ref: torch.Tensor, batch: dict[str, Any],
             ctx: LossContext) -> tuple[torch.Tensor, Metrics]:
        """e: (B,); batch["label"]: (B,). beta plays no part; it is logged as beta_t like every method's."""
        pos = (batch["label"].to(e.device) > 0.5).to(e.dtype)
        loss = (pos * e).sum() / pos.sum().clamp(min=1)
        return loss, {"positives": pos.sum(), "beta_t": ctx.beta}
