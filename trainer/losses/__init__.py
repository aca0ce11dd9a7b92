"""Preference losses on per-sample denoising errors e = ||prediction - target||^2 (mean over elements).

Each method is a small module with its exact formula. They all see the policy's and the frozen reference's
errors on the *same* noisy inputs, and return (loss, metrics).
"""

from trainer.losses.dpo import dpo_loss
from trainer.losses.kto import kto_loss
from trainer.losses.pnapo import DynamicBeta, pnapo_loss
from trainer.losses.sft import sft_loss
from trainer.losses.tgo import tgo_loss

__all__ = ["DynamicBeta", "dpo_loss", "kto_loss", "pnapo_loss", "sft_loss", "tgo_loss"]
