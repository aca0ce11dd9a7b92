"""The embedded default world: handwritten digits, a tiny text-to-image model and two digit classifiers.

Everything is built from scikit-learn's bundled digits (1,797 8x8 images, no download), deterministically
from a seed, and cached in a directory stamped with `world.json`:

  base/            a StableDiffusion3Pipeline: a small VAE trained on the digits (16x16 RGB <-> 4x8x8 latents),
                   a small SD3 transformer and tiny CLIP/T5 text encoders (offline tokenizers, 10-token
                   prompts) trained together by rectified flow on prompts like "a handwritten 7";
  rewards/fidelity an MLP digit classifier trained on half of the digits: the training reward;
  rewards/heldout  a CNN trained on the other half: used only for evaluation;
  prompts/         train.txt and eval.txt, whose prompt templates do not overlap.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from world.rewards import WORDS, DigitCNN, DigitMLP, save_classifier
from world.tokenizers import clip_tokenizer, t5_tokenizer

log = logging.getLogger("tauflow")
WORLD_VERSION = 2
SIZE = 16
MAX_TOKENS = 10
BUILD_THREADS = 2
TRAIN_TEMPLATES = ["a handwritten {n}", "the digit {w}", "a neat {n}", "number {w} written by hand", "a bold {w}"]
EVAL_TEMPLATES = ["a sloppy {n}", "a thin {w}", "the number {n}"]


def digit_images() -> tuple[torch.Tensor, np.ndarray]:
    """All digits as (N, 3, 16, 16) in [0, 1] (bilinear 2x upsampling of the 8x8 originals) and labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.from_numpy(data.images.astype(np.float32) / 16.0)[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x.expand(-1, 3, -1, -1).contiguous(), data.target


def prompt(digit: int, template: str) -> str:
    return template.format(n=digit, w=WORDS[digit])


def write_prompts(directory: Path, n_train: int, n_eval: int, seed: int) -> None:
    rng = random.Random(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, templates, n in (("train", TRAIN_TEMPLATES, n_train), ("eval", EVAL_TEMPLATES, n_eval)):
        combos = [prompt(d, t) for t in templates for d in range(10)]
        rng.shuffle(combos)
        lines = [combos[i % len(combos)] for i in range(n)]  # repeats are distinct prompts (dedupe off)
        (directory / f"{name}.txt").write_text("\n".join(lines) + "\n")


def _text_encoders(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    tok = clip_tokenizer(MAX_TOKENS)
    clip_cfg = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=2, max_position_embeddings=77, projection_dim=32,
                    bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    t5 = t5_tokenizer(MAX_TOKENS)
    return (
        CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)), tok,
        CLIPTextModelWithProjection(CLIPTextConfig(**clip_cfg)), tok,
        T5EncoderModel(T5Config(vocab_size=len(t5), d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4)), t5,
    )


class TokenizeOnce:
    """A tokenizer that remembers its answers. The flow model is trained on the same 51 prompts every step, and
    re-tokenizing them took a third of the step; the results are bit for bit those of the wrapped tokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer, self.answers = tokenizer, {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, text: str | list[str], **kwargs: Any) -> Any:
        key = (tuple(text) if isinstance(text, list) else text, tuple(sorted(kwargs.items())))
        if key not in self.answers:
            self.answers[key] = self.tokenizer(text, **kwargs)
        return self.answers[key]


def train_vae(images: torch.Tensor, seed: int, steps: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=SIZE, mid_block_add_attention=False)
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    x_all = images * 2 - 1
    for _ in range(steps):
        x = x_all[torch.randint(len(x_all), (32,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=gen)).sample
        loss = F.mse_loss(recon, x) + 1e-5 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(x_all).latent_dist.mean
    vae.register_to_config(shift_factor=float(latents.mean()), scaling_factor=float(1 / latents.std()))
    return vae, loss.item()


def train_transformer(pipe, images: torch.Tensor, labels: np.ndarray, seed: int, steps: int) -> float:
    """Rectified flow: x_t = (1 - s) x0 + s eps, predict v = eps - x0; 10% empty prompts for guidance.

    The text encoders are trained with the transformer: random frozen encoders separate "7" from "3" too weakly.
    """
    torch.manual_seed(seed)
    vae, cfg = pipe.vae, pipe.vae.config
    with torch.no_grad():
        x0_all = (vae.encode(images * 2 - 1).latent_dist.mean - cfg.shift_factor) * cfg.scaling_factor
    texts = [""] + [prompt(d, t) for d in range(10) for t in TRAIN_TEMPLATES]
    per_digit = len(TRAIN_TEMPLATES)
    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
    params = [p for m in modules for p in m.parameters()]
    for m in modules:
        m.train()
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    labels_t = torch.from_numpy(labels)
    losses = []
    for _ in range(steps):
        embeds, _, pooled, _ = pipe.encode_prompt(texts, texts, texts, do_classifier_free_guidance=False,
                                                  max_sequence_length=MAX_TOKENS)
        idx = torch.randint(len(x0_all), (64,), generator=gen)
        x0 = x0_all[idx]
        text = 1 + labels_t[idx] * per_digit + torch.randint(per_digit, (64,), generator=gen)
        text = torch.where(torch.rand(64, generator=gen) < 0.1, torch.zeros_like(text), text)
        sigma = torch.sigmoid(torch.randn(64, generator=gen))[:, None, None, None]
        eps = torch.randn(x0.shape, generator=gen)
        xt = (1 - sigma) * x0 + sigma * eps
        v = pipe.transformer(hidden_states=xt, encoder_hidden_states=embeds[text], pooled_projections=pooled[text],
                             timestep=sigma.flatten() * 1000).sample
        loss = F.mse_loss(v, eps - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    for m in modules:
        m.eval()
    return float(np.mean(losses[-50:]))


def train_classifier(model_cls: type[torch.nn.Module], images: torch.Tensor, labels: np.ndarray, seed: int,
                     steps: int) -> torch.nn.Module:
    """Cross-entropy with shift and noise augmentation (generated digits are not pixel-perfect). The model is
    initialised here, after seeding, so that it does not depend on what the process drew before."""
    torch.manual_seed(seed)
    model = model_cls(SIZE)
    gen = torch.Generator().manual_seed(seed)
    x_all, y_all = images[:, :1], torch.from_numpy(labels)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(len(x_all), (128,), generator=gen)
        dx, dy = (int(v) for v in torch.randint(-1, 2, (2,), generator=gen))
        x = torch.roll(x_all[idx], shifts=(dy, dx), dims=(2, 3))
        x = (x + 0.1 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
        loss = F.cross_entropy(model(x), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def classifier_accuracy(model: torch.nn.Module, images: torch.Tensor, labels: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(images[:, :1]).argmax(-1).numpy() == labels).mean())


def build_world(directory: str | Path, seed: int = 0, *, vae_steps: int = 400, flow_steps: int = 2000,
                classifier_steps: int = 400, n_train_prompts: int = 200, n_eval_prompts: int = 50) -> Path:
    """Build (or reuse, when its stamp matches) the demo world in `directory`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    directory = Path(directory)
    settings = {"version": WORLD_VERSION, "seed": seed, "vae_steps": vae_steps, "flow_steps": flow_steps,
                "classifier_steps": classifier_steps, "prompts": [n_train_prompts, n_eval_prompts]}
    stamp = directory / "world.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("settings") == settings:
        log.info("world: %s is built; reusing it", directory)
        return directory
    start = time.perf_counter()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    # A fixed thread count and deterministic kernels (the backward of the prompt-embedding lookup otherwise
    # accumulates in thread order) keep builds bit-for-bit reproducible across processes.
    torch.set_num_threads(BUILD_THREADS)
    torch.use_deterministic_algorithms(True)
    try:
        images, labels = digit_images()
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(labels))
        half_a, half_b = order[: len(order) // 2], order[len(order) // 2 :]
        fidelity = train_classifier(DigitMLP, images[half_a], labels[half_a], seed, classifier_steps)
        heldout = train_classifier(DigitCNN, images[half_b], labels[half_b], seed + 1, classifier_steps)
        save_classifier(fidelity, "mlp", SIZE, directory / "rewards" / "fidelity")
        save_classifier(heldout, "cnn", SIZE, directory / "rewards" / "heldout")
        vae, vae_loss = train_vae(images, seed, vae_steps)
        te1, tok1, te2, tok2, te3, tok3 = _text_encoders(seed)
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(
            sample_size=SIZE // 2, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=16,
            num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=64, pooled_projection_dim=64,
        )
        models = dict(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=vae,
                      text_encoder=te1, text_encoder_2=te2, text_encoder_3=te3)
        tokenizers = dict(tokenizer=tok1, tokenizer_2=tok2, tokenizer_3=tok3)
        training = StableDiffusion3Pipeline(**models, **{k: TokenizeOnce(t) for k, t in tokenizers.items()})
        flow_loss = train_transformer(training, images, labels, seed, flow_steps)
        StableDiffusion3Pipeline(**models, **tokenizers).save_pretrained(directory / "base")
        write_prompts(directory / "prompts", n_train_prompts, n_eval_prompts, seed)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
    report = {
        "settings": settings,
        "seconds": round(time.perf_counter() - start, 1),
        "vae_final_mse": vae_loss,
        "flow_final_loss": flow_loss,
        "fidelity_accuracy_on_other_half": classifier_accuracy(fidelity, images[half_b], labels[half_b]),
        "heldout_accuracy_on_other_half": classifier_accuracy(heldout, images[half_a], labels[half_a]),
    }
    stamp.write_text(json.dumps(report, indent=2))
    log.info("world: built %s in %.0f s", directory, report["seconds"])
    return directory
