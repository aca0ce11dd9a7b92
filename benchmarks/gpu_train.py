"""`python -m benchmarks.gpu_train [--tiny] [--models ...]`: tauflow's training step against a bare loop, on a GPU.

For each model, a random-weight pipeline with the real architecture (benchmarks/architectures.py) is built on
the GPU and saved; the real generate, score, threshold and pair stages make a small dataset from it at 512 px;
then tauflow's public entry `trainer.recipe.train` runs DPO, PNAPO and TGO (full fine-tune, 8 pairs or 16
samples a step, bf16 autocast, AdamW), and a bare loop written like diffusers' Diffusion-DPO research script runs
DPO on the same model and batch size: fp32 policy under bf16 autocast, a bf16 frozen reference, AdamW, latents
and text embeddings of one batch precomputed in memory (the loop's best case). Reported: median seconds per step
after warm-up (tauflow: from its log.jsonl with log_every=1, whose per-step loss `.item()` synchronises; the bare
loop: wall time with `torch.cuda.synchronize()` per step), peak `torch.cuda.max_memory_allocated`, the ratios,
and the GPU's name.

SD3-medium's T5-XXL is replaced by a one-layer T5 of the same width (4096): the denoiser and its inputs keep
their real sizes, while the 4.7 B-parameter encoder, which only embeds prompts (cached after the first step),
would dominate the saving and loading time. SD3-medium trains with gradient checkpointing in both runs (without
it, 16 samples would not fit on 80 GB). A random UNet's conv_out is scaled by 0.05 so that its output stays
in bf16 range. `--tiny` runs the same code on the CPU with the test suite's tiny pipelines.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml



MODELS = ("sd15", "sd3-medium")
# SD3-medium at 16 samples of 512 px keeps about 42 GB of activations (trainer/memory.py): checkpointed in both runs
CHECKPOINTING = {"sd15": False, "sd3-medium": True}
METHODS = ("dpo", "pnapo", "tgo")


def build_pipeline(model: str, tiny: bool):
    """A random-weight pipeline of `model`'s architecture (tiny: the test suite's)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from benchmarks import architectures as arch
    from world.tokenizers import clip_tokenizer, t5_tokenizer

    if tiny:
        from tests.tiny_models import build_sd, build_sd3

        return build_sd() if model == "sd15" else build_sd3()
    if model == "sd15":
        unet = UNet2DConditionModel(**arch.SD15_UNET)
        with torch.no_grad():
            unet.conv_out.weight.mul_(0.05)
            unet.conv_out.bias.mul_(0.05)
        return StableDiffusionPipeline(
            vae=AutoencoderKL(**arch.VAE_4CH), text_encoder=CLIPTextModel(CLIPTextConfig(**arch.CLIP_L)),
            tokenizer=clip_tokenizer(), unet=unet, scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    t5 = T5Config(**{**arch.T5_XXL, "num_layers": 1, "d_ff": 1024})
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**arch.SD3_MEDIUM), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=AutoencoderKL(**arch.VAE_16CH, shift_factor=0.0609, scaling_factor=1.5305),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**arch.CLIP_L)), tokenizer=clip_tokenizer(),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**arch.CLIP_BIGG)), tokenizer_2=clip_tokenizer(),
        text_encoder_3=T5EncoderModel(t5), tokenizer_3=t5_tokenizer())


def prepare(model: str, tiny: bool, root: Path, device: str) -> dict:
    """Save the pipeline and make its dataset with the real stages; returns the base manifest as a dict."""
    from pipeline.config import load_manifest
    from pipeline.generate import run_generate
    from pipeline.pair import run_pair
    from pipeline.score import run_score
    from pipeline.threshold import run_threshold

    torch.manual_seed(0)
    with torch.device(device):
        pipe = build_pipeline(model, tiny)
    pipe.save_pretrained(root / "model")
    del pipe
    free()
    (root / "prompts.txt").write_text("".join(f"a photo of object {i}\n" for i in range(8)))
    px = 16 if tiny else 512
    base = {
        "run": {"name": model, "output_dir": str(root / "out"), "executor": "local"},
        "generate": {"model": str(root / "model"), "prompts": str(root / "prompts.txt"), "images_per_prompt": 4,
                     "num_inference_steps": 2, "height": px, "width": px, "batch_size": 8,
                     "torch_dtype": "float32" if tiny else "bfloat16"},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}]},
        "threshold": {"reward": "bright"},
        "pair": {"reward": "bright", "strategy": "all"},
    }
    manifest = load_manifest(write_yaml(root / "base.yaml", base))
    for stage in (run_generate, run_score, run_threshold, run_pair):
        stage(manifest)
    return base


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if torch.cuda.is_available() else None


def run_tauflow(base: dict, root: Path, method: str, steps: int, warmup: int, mixed: str, checkpointing: bool) -> dict:
    """One `trainer.recipe.train` run; seconds per step from its log after `warmup` steps."""
    import shutil

    from pipeline.config import load_manifest
    from trainer.recipe import train

    train_cfg = {"method": method, "batch_size": 8 if method in ("dpo", "pnapo") else 16, "max_steps": warmup + steps,
                 "learning_rate": 1e-6, "mixed_precision": mixed, "log_every": 1, "checkpoint_every": 10**6,
                 "gradient_checkpointing": checkpointing}
    manifest = load_manifest(write_yaml(root / f"{method}.yaml", {**base, "train": train_cfg}))
    free()
    out = train(manifest, overwrite=True)
    peak = peak_gb()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][warmup:]
    shutil.rmtree(out)  # checkpoint and final weights: gigabytes at real scale
    times = [train_cfg["batch_size"] / r["samples_per_s"] for r in records]
    return {"step_s": statistics.median(times), "peak_gb": peak}


def run_bare(base: dict, steps: int, warmup: int, device: str, mixed: bool, checkpointing: bool) -> dict:
    """Diffusion-DPO written out like diffusers' research script, on one precomputed batch of 8 pairs."""
    import torch.nn.functional as F
    from diffusers import DiffusionPipeline

    from pipeline.config import load_manifest
    from pipeline.shards import open_dataset
    from trainer.data import GlobalBatches

    manifest = load_manifest(write_yaml(Path(base["run"]["output_dir"]).parent / "bare.yaml", base))
    pairs = manifest.stage_dir("pair")
    batch = next(GlobalBatches(pairs, ["prompt", "winner_latent", "loser_latent"], 8, kind="pairs").epoch(0))
    assert open_dataset(pairs).num_rows >= 8
    free()
    frozen = torch.bfloat16 if mixed else torch.float32
    pipe = DiffusionPipeline.from_pretrained(base["generate"]["model"], torch_dtype=frozen).to(device)
    flow = hasattr(pipe, "transformer")
    policy = (pipe.transformer if flow else pipe.unet).to(torch.float32).requires_grad_(True).train()
    reference = copy.deepcopy(policy).to(frozen).requires_grad_(False).eval()
    if checkpointing:
        policy.enable_gradient_checkpointing()
    with torch.no_grad():
        if flow:
            emb, _, pooled, _ = pipe.encode_prompt(batch["prompt"], batch["prompt"], batch["prompt"], device=device,
                                                   do_classifier_free_guidance=False)
        else:
            emb, _ = pipe.encode_prompt(batch["prompt"], device, 1, False)
            pooled = None
    emb, pooled = emb.repeat(2, 1, 1), pooled.repeat(2, 1) if pooled is not None else None
    x0 = torch.cat([batch["winner_latent"], batch["loser_latent"]]).to(device)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mixed)

    def predict(model, x_t, t):
        if flow:
            return model(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=emb, pooled_projections=pooled).sample
        return model(x_t, t, emb).sample

    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        eps = torch.randn_like(x0[:8]).repeat(2, 1, 1, 1)
        if flow:
            t = torch.sigmoid(torch.randn(8, device=device)).repeat(2)
            s = t.view(-1, 1, 1, 1)
            x_t, target = (1 - s) * x0 + s * eps, eps - x0
        else:
            t = torch.randint(0, pipe.scheduler.config.num_train_timesteps, (8,), device=device).repeat(2)
            x_t, target = pipe.scheduler.add_noise(x0, eps, t), eps
        with autocast:
            pred = predict(policy, x_t, t)
            with torch.no_grad():
                ref = predict(reference, x_t, t)
        err = (pred.float() - target).pow(2).mean(dim=[1, 2, 3])
        ref_err = (ref.float() - target).pow(2).mean(dim=[1, 2, 3])
        diff = (err[:8] - err[8:]) - (ref_err[:8] - ref_err[8:])
        loss = -F.logsigmoid(-0.5 * 5000.0 * diff).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    peak = peak_gb()
    del pipe, policy, reference, optimizer
    free()
    return {"step_s": statistics.median(times), "peak_gb": peak}


def bench_model(model: str, tiny: bool, root: Path, steps: int, warmup: int) -> dict:
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    mixed = device == "cuda"
    base = prepare(model, tiny, root, device)
    result = {"bare_dpo": run_bare(base, steps, warmup, device, mixed, CHECKPOINTING[model])}
    for method in METHODS:
        r = run_tauflow(base, root, method, steps, warmup, "bf16" if mixed else "no", CHECKPOINTING[model])
        r["time_ratio"] = r["step_s"] / result["bare_dpo"]["step_s"]
        if r["peak_gb"] is not None:
            r["memory_ratio"] = r["peak_gb"] / result["bare_dpo"]["peak_gb"]
        result[f"tauflow_{method}"] = r
    return result


def run(root: Path, models: tuple[str, ...] = MODELS, tiny: bool = False, steps: int = 20, warmup: int = 5) -> dict:
    results = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not tiny else "cpu (tiny)",
               "samples_per_step": 16, "steps": steps, "warmup": warmup}
    for model in models:
        results[model] = bench_model(model, tiny, root / model, steps, warmup)
    return results


def bench_gpu_train(tmp: Path) -> dict:
    """For `python -m benchmarks`: the GPU figures, or the reason they were skipped."""
    if not torch.cuda.is_available():
        print("gpu_train: skipped: no CUDA device (python -m benchmarks.gpu_train --tiny runs the code on the CPU)")
        return {"skipped": "no CUDA device"}
    return run(tmp)


def table(results: dict) -> str:
    lines = [f"device: {results['device']}; 16 samples (8 pairs) a step; median of {results['steps']} steps after "
             f"{results['warmup']} warm-up", "", "| model | run | s/step | peak GB | time vs bare | memory vs bare |",
             "|---|---|---|---|---|---|"]
    for model in (k for k in results if isinstance(results[k], dict)):
        for run_name, r in results[model].items():
            peak, memory = "-", "-"
            if r["peak_gb"] is not None:
                peak, memory = f"{r['peak_gb']:.1f}", f"{r.get('memory_ratio', 1.0):.2f}"
            lines.append(f"| {model} | {run_name} | {r['step_s']:.3f} | {peak} | {r.get('time_ratio', 1.0):.2f} | {memory} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_train")
    parser.add_argument("--tiny", action="store_true", help="the same code with tiny models on the CPU")
    parser.add_argument("--models", nargs="*", choices=MODELS, default=list(MODELS))
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; tiny 3)")
    args = parser.parse_args()
    steps, warmup = (args.steps or 3, 2) if args.tiny else (args.steps or 20, 5)
    with tempfile.TemporaryDirectory(prefix="bench-gpu-train-") as tmp:
        results = run(Path(tmp), tuple(args.models), args.tiny, steps, warmup)
    print(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
