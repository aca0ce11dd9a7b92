"""The seed rule: every sample's identity and prior noise follow from (run seed, prompt_id, sample_index).

    seed_i    = int.from_bytes(blake2b(f"tauflow-seed:{run_seed}:{prompt_id}:{sample_index}", 8 bytes)) & (2**63 - 1)
    sample_id = blake2b(f"tauflow-sample:{run_seed}:{prompt_id}:{sample_index}", 8 bytes).hex()
    noise     = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed_i)).to(noise_dtype)

Nothing depends on batch size, worker count, machine or the order prompts are processed in.

Round r >= 1 of a multi-round run (run.rounds) runs with its own run seed, `round_seed(run_seed, r)`: fresh
prior noises (and, with run.prompts_per_round, a fresh draw of prompts) every round, none shared between runs.
"""

from __future__ import annotations

import hashlib

import torch


def _digest(tag: str, run_seed: int, prompt_id: str, sample_index: int) -> bytes:
    return hashlib.blake2b(f"{tag}:{run_seed}:{prompt_id}:{sample_index}".encode(), digest_size=8).digest()


def sample_seed(run_seed: int, prompt_id: str, sample_index: int) -> int:
    return int.from_bytes(_digest("tauflow-seed", run_seed, prompt_id, sample_index), "big") & (2**63 - 1)


def sample_id(run_seed: int, prompt_id: str, sample_index: int) -> str:
    return _digest("tauflow-sample", run_seed, prompt_id, sample_index).hex()


def prior_noise(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The N(0, 1) prior latent of one sample, drawn on the CPU in float32 and stored at `dtype`."""
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)).to(dtype)


def round_seed(run_seed: int, round_: int) -> int:
    """The run seed of round `round_` (>= 1): a hash, so that no round of one run seed is a round of another."""
    digest = hashlib.blake2b(f"tauflow-round:{run_seed}:{round_}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
