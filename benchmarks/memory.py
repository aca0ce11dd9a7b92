"""`python -m benchmarks.memory`: what fits on one 80 GB GPU, for five real models, from trainer.memory.

Each model is trained with a preference method (a frozen reference is needed) at its native resolution, frozen
weights in bf16, bf16 autocast and gradient checkpointing on. The optimizer is fp32 AdamW where one DPO pair
(2 samples) fits with it, else bitsandbytes' 8-bit AdamW. Activations scale with the batch, so the largest
batch that fits follows from the fixed part and the per-sample part. Nothing is loaded; this runs on a CPU.
"""

from __future__ import annotations

import argparse

from benchmarks.architectures import ARCHITECTURES, NATIVE_RESOLUTION, PUBLISHED_DENOISER
from trainer.memory import GB, Estimate, Settings, estimate


def _split(e: Estimate) -> tuple[int, int]:
    """(bytes that do not depend on the batch, activation bytes per sample) of a one-sample estimate."""
    activations = sum(v for k, v in e.items.items() if k.startswith("activations"))
    return e.total - activations, activations


def fits(name: str, lora_rank: int | None, budget: float) -> dict:
    res = NATIVE_RESOLUTION[name]
    for optimizer in ("adamw", "adamw8bit"):
        settings = Settings(batch_size=1, height=res, width=res, lora_rank=lora_rank, frozen_dtype="bfloat16",
                            mixed_precision="bf16", optimizer=optimizer, gradient_checkpointing=True)
        e = estimate(ARCHITECTURES[name], settings)
        fixed, per_sample = _split(e)
        if fixed + 2 * per_sample <= budget:
            break
    return {"model": name, "mode": f"LoRA r{lora_rank}" if lora_rank else "full", "resolution": res,
            "optimizer": optimizer, "fixed_gb": fixed / GB, "per_sample_gb": per_sample / GB,
            "one_pair_gb": (fixed + 2 * per_sample) / GB, "max_samples": max(0, int((budget - fixed) // per_sample)),
            "denoiser_params": e.parameters[next(n for n in ("unet", "transformer") if n in e.parameters)],
            "trainable": e.trainable}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("--gb", type=float, default=80.0, help="GPU memory in GB (1e9 bytes)")
    args = parser.parse_args()
    rows = [fits(name, rank, args.gb * GB) for name in ARCHITECTURES for rank in (None, 16)]
    print(f"What fits on one {args.gb:.0f} GB GPU (preference training with a reference, frozen weights bf16, bf16 "
          "autocast, gradient checkpointing; 8-bit AdamW only where fp32 AdamW does not fit one pair)\n")
    print("| model | denoiser params (published) | mode | trainable | resolution | optimizer | weights, grads, optimizer GB "
          "| activations GB/sample | 1 pair GB | max samples/step | fits |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        published = PUBLISHED_DENOISER[r["model"]]
        print(f"| {r['model']} | {r['denoiser_params'] / 1e9:.2f} B ({published / 1e9:.2g} B) | {r['mode']} "
              f"| {r['trainable'] / 1e6:,.1f} M | {r['resolution']} | {r['optimizer']} | {r['fixed_gb']:.1f} "
              f"| {r['per_sample_gb']:.2f} | {r['one_pair_gb']:.1f} | {r['max_samples']} "
              f"| {'yes' if r['one_pair_gb'] <= args.gb else 'no'} |")


if __name__ == "__main__":
    main()
