"""GPU-scale score and generate: real-size random-weight models, each stage against its bare compute.

Score: an HPSv2-size reward (open_clip ViT-H-14, random weights, bf16 autocast) over 512 px PNG shards,
batch 64: the ScoreWorker's images/s against the reward's forward alone on device-resident tensors (goal: at
least 0.8x), and decode + letterbox alone on one thread and on the worker's threads.
Generate: an SD1.5-size pipeline built from configs (fp16, 512 px, 20 steps, CFG 7.5, batch 8): the
GenerateWorker against a bare loop of the same pipeline calls (goal: at most 1.05x).
Skipped, with the reason printed, without CUDA:

    python -m benchmarks --only gpu_data
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import ratio, timed, timed_pair
from benchmarks.stages import decode_rates


def bench_gpu_data(tmp: Path) -> dict:
    import torch

    if not torch.cuda.is_available():
        print("gpu_data: skipped: CUDA is not available on this machine")
        return {"skipped": "CUDA is not available"}
    return {"gpu": torch.cuda.get_device_name(0), "score": bench_score_at_scale(tmp / "score"),
            "generate": bench_generate_at_scale(tmp / "generate", build_sd15(tmp / "sd15"))}


def png_samples(path: Path, n: int, size: int, per_shard: int) -> Path:
    """A samples dataset of `n` smooth-noise PNGs (about a generated image's PNG size), `per_shard` per shard."""
    import numpy as np
    import pyarrow as pa
    from PIL import Image

    from pipeline.generate import encode_png
    from pipeline.schema import samples_features
    from pipeline.shards import StageOutput

    rng = np.random.default_rng(0)
    features = samples_features(None)
    out = StageOutput(path, kind="samples", stage="bench", config_hash="bench")
    for shard, lo in enumerate(range(0, n, per_shard)):
        rows = range(lo, min(n, lo + per_shard))
        images = []
        for _ in rows:
            coarse = Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((size, size), Image.BICUBIC)
            grain = rng.integers(-6, 7, (size, size, 3))
            images.append(encode_png(Image.fromarray(np.clip(np.asarray(coarse, int) + grain, 0, 255).astype(np.uint8))))
        k = len(rows)
        columns: dict[str, Any] = {
            "sample_id": [f"s{i}" for i in rows], "prompt_id": [f"p{i // 8}" for i in rows],
            "prompt": [f"a photo of object {i // 8}" for i in rows], "negative_prompt": [None] * k,
            "sample_index": [i % 8 for i in rows], "seed": list(rows),
            "image": [{"bytes": b, "path": None} for b in images],
            "model": ["bench"] * k, "revision": [None] * k, "scheduler": ["bench"] * k, "num_inference_steps": [20] * k,
            "guidance_scale": [7.5] * k, "height": [size] * k, "width": [size] * k, "torch_dtype": ["float16"] * k,
        }
        out.write(shard, pa.table(columns, schema=features.arrow_schema))
    out.finalize(num_shards=-(-n // per_shard), features=features, config={})
    return path


def bench_score_at_scale(tmp: Path, *, arch: str = "ViT-H-14", arch_config: str | None = None, size: int = 512,
                         images: int = 1024, per_shard: int = 256, batch: int = 64, device: str = "cuda",
                         cpus: int | None = None) -> dict:
    """ScoreWorker vs the reward's forward alone (the same batches, pixels already on the device)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from pipeline.config import RewardSpec
    from pipeline.score import ScoreWorker, decode_images
    from pipeline.shards import open_dataset
    from rewards.bank import available_cpus

    cpus = cpus or available_cpus()
    tmp.mkdir(parents=True, exist_ok=True)
    options = {"arch": arch}
    if arch_config:
        open_clip.add_model_config(arch_config)
        options = {"arch_config": arch_config}
        arch = Path(arch_config).stem
    torch.manual_seed(0)
    checkpoint = tmp / "hps.safetensors"
    save_file({k: v.contiguous() for k, v in open_clip.create_model(arch, pretrained=None).state_dict().items()}, str(checkpoint))
    spec = RewardSpec(name="hps", kind="hpsv2", checkpoint=str(checkpoint), options=options)
    samples = open_dataset(png_samples(tmp / "samples", images, size, per_shard))
    out = tmp / "scored"
    (out / ".progress").mkdir(parents=True)
    worker = ScoreWorker([spec.model_dump(mode="json")], str(samples.path), str(out), batch, device, False, cpus)
    bank, reward = worker.bank, worker.bank.loaded["hps"]
    tables = [samples.read_shard(i, ["image", "prompt"]) for i in range(len(samples.shard_paths))]

    def batches():
        for t in tables:
            for lo in range(0, t.num_rows, batch):
                yield decode_images(t["image"].slice(lo, batch)), t["prompt"].slice(lo, batch).to_pylist()

    first = bank.prepare(*next(batches()), [reward])
    pixels, prompts = bank._to_device(first).pixels[reward.preprocess_key], first.prompts

    def forward():
        with torch.inference_mode(), bank._autocast():
            for _ in range(images // batch):
                reward.score_pixels(pixels, prompts)

    def stage():
        for i in range(len(tables)):
            worker.process({"unit": i})

    forward(), stage()  # warm-up: kernels, allocator, page cache
    t_forward = timed(forward, 3)
    t_stage = timed(stage, 3)
    return {"images": images, "batch": batch, "dtype": bank.dtype, "decode_threads": bank.threads,
            "forward_images_per_s": images / t_forward["median"], "stage_images_per_s": images / t_stage["median"],
            "stage_vs_forward_throughput": t_forward["median"] / t_stage["median"],
            **decode_rates([reward], batches, images, cpus)}


def build_sd15(directory: Path) -> Path:
    """SD1.5's architecture from configs (UNet 320-1280, VAE 128-512, CLIP ViT-L/14 text), random weights, fp16.
    The UNet's output layer is scaled by 0.05 so that 20 random steps stay finite."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from pipeline.offline_tokenizers import clip_tokenizer

    torch.manual_seed(0)
    tok = clip_tokenizer()
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.05)
        unet.conv_out.bias.mul_(0.05)
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(directory)
    return directory


def bench_generate_at_scale(tmp: Path, model: Path, *, size: int = 512, steps: int = 20, batch: int = 8,
                            prompts: int = 8, per_shard: int = 4, torch_dtype: str = "float16", device: str = "cuda",
                            cpus: int | None = None) -> dict:
    """GenerateWorker (units -> PNG shards) vs a bare loop over the same pipeline calls from the same noise."""
    import torch

    from pipeline.config import GenerateSection
    from pipeline.generate import DTYPES, GenerateWorker, plan_units
    from pipeline.prompts import load_prompts
    from pipeline.seeds import prior_noise, sample_seed
    from rewards.bank import available_cpus

    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "prompts.txt").write_text("\n".join(f"a photo of object {i}" for i in range(prompts)) + "\n")
    cfg = GenerateSection(model=str(model), prompts=tmp / "prompts.txt", images_per_prompt=batch, batch_size=batch,
                          num_inference_steps=steps, guidance_scale=7.5, height=size, width=size, torch_dtype=torch_dtype,
                          prompts_per_shard=per_shard, device=device, cpus_per_worker=cpus or available_cpus())
    out = tmp / "shards"
    (out / ".progress").mkdir(parents=True)
    worker = GenerateWorker(cfg.model_dump(mode="json"), 0, str(out))  # model load excluded from both timings
    rows, _ = load_prompts(cfg.prompts)
    units = plan_units(rows, per_shard)
    pipe, layout = worker.generator.pipe, worker.generator.layout

    def bare():
        for p in rows:
            seeds = [sample_seed(0, p.prompt_id, i) for i in range(batch)]
            noise = torch.stack([prior_noise(s, layout.shape) for s in seeds]).to(device, DTYPES[torch_dtype])
            pipe(prompt=[p.text] * batch, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                 latents=noise, output_type="pil")

    def stage():
        for u in units:
            worker.process(u)

    bare()  # warm-up
    t_stage, t_bare = timed_pair(stage, bare, repeats=3)
    images = prompts * batch
    return {"images": images, "bare_images_per_s": images / t_bare["median"],
            "stage_images_per_s": images / t_stage["median"], "ratio": ratio(t_stage, t_bare)}
