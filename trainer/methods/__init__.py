"""The training methods by name: the only list of them. Manifests, the training loop and the tests read it."""

from trainer.methods.base import LossContext, Method, Options
from trainer.methods.dpo import DPO
from trainer.methods.kto import KTO
from trainer.methods.pnapo import PNAPO
from trainer.methods.sft import SFT
from trainer.methods.tgo import TGO

METHODS: dict[str, Method] = {m.name: m for m in (TGO(), PNAPO(), DPO(), KTO(), SFT())}
# each method's own manifest keys (train.temperature, ...) -> the method they belong to
OPTION_OWNERS: dict[str, str] = {key: m.name for m in METHODS.values() for key in m.options.model_fields}

__all__ = ["METHODS", "OPTION_OWNERS", "LossContext", "Method", "Options"]
