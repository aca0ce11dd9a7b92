"""The training recipe: one explicit loop for TGO, PNAPO, Diffusion-DPO, Diffusion-KTO and SFT.

Read top to bottom: load the generator -> pick its family adapter -> freeze a reference (a frozen copy, or the
base weights under a disabled LoRA adapter) -> stream batches -> per step, draw the step's randomness from
(seed, step) for the *global* batch, compute policy and reference errors on the same noisy inputs, apply the
method's loss -> log, checkpoint, save. Randomness and data depend only on (seed, step), so `--resume latest`
continues exactly and W processes match one process on the same global batch.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Manifest, TrainSection
from pipeline.errors import StageError
from pipeline.families import lora_format
from pipeline.shards import open_dataset, write_json_atomic
from pipeline.stage import Train
from trainer.adapters import Adapter, adapter_for
from trainer.data import GlobalBatches
from trainer.losses import DynamicBeta, dpo_loss, kto_loss, pnapo_loss, sft_loss, tgo_loss

log = logging.getLogger("tauflow")
PAIR_METHODS = ("pnapo", "dpo")


def default_beta(method: str, family: str) -> float:
    if method == "tgo":
        return 1.0
    return 2000.0 if family == "rectified_flow" else 5000.0


def data_columns(method: str, available: set[str] | None = None) -> list[str]:
    """Columns a method reads; recorded final latents are used instead of re-encoding images when present."""
    if method in PAIR_METHODS:
        cols = ["pair_id", "prompt", "winner_id", "loser_id", "winner_image", "loser_image", "gap"]
        cols += ["winner_noise", "loser_noise"] if method == "pnapo" else []
        latents = ["winner_latent", "loser_latent"]
    else:
        cols, latents = ["sample_id", "prompt", "image", "label", "weight"], ["latent"]
    return cols + [c for c in latents if available is None or c in available]


def load_generator(manifest: Manifest, device: torch.device) -> tuple[Any, Adapter]:
    from pipeline.generate import load_model

    cfg = manifest.require("train")
    gen = manifest.generate
    ref = cfg.model or (gen.model if gen else None)
    if ref is None:
        raise StageError(f"{manifest.source}: train.model is not set and there is no generate.model to start from")
    pipe = load_model(ref, local_files_only=gen.local_files_only if gen else False, device=str(device))
    text_kwargs = {}
    if gen and "max_sequence_length" in gen.pipeline_kwargs:
        text_kwargs["max_sequence_length"] = gen.pipeline_kwargs["max_sequence_length"]
    sampled = {"guidance_scale": gen.guidance_scale, "height": gen.height, "width": gen.width} if gen else {}
    adapter = adapter_for(pipe, text_kwargs, **sampled)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return pipe, adapter


class Latents:
    """VAE latents of training images, cached by sample id (the VAE is frozen). Cached images are encoded one
    at a time so that a latent does not depend on the batch that first met it (exact resumes)."""

    def __init__(self, adapter: Adapter, enabled: bool):
        self.adapter, self.enabled, self.cache = adapter, enabled, {}

    def __call__(self, pixels: torch.Tensor, ids: list[str], recorded: torch.Tensor | None = None) -> torch.Tensor:
        """`recorded`: the sampler's own final latents, exact where re-encoding the image is not."""
        if recorded is not None:
            return recorded.to(self.adapter.pipe.device)
        if not self.enabled:
            return self.adapter.encode_images(pixels)
        for i, k in enumerate(ids):
            if k not in self.cache:
                self.cache[k] = self.adapter.encode_images(pixels[i : i + 1])[0]
        return torch.stack([self.cache[k] for k in ids])


class Step:
    """Computes one method's loss on one batch; holds the policy, the reference and the adapter."""

    def __init__(self, cfg: TrainSection, adapter: Adapter, policy, reference, accelerator, beta: float,
                 dynamic: DynamicBeta | None):
        self.cfg, self.adapter, self.policy, self.reference = cfg, adapter, policy, reference
        self.accelerator, self.beta, self.dynamic = accelerator, beta, dynamic
        self.latents = Latents(adapter, cfg.cache)

    def _randomness(self, step: int, n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh noise and t drawn for the global batch at `step`; this process's `n` rows of them."""
        acc = self.accelerator
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        g = max(self.cfg.batch_size, n * acc.num_processes)
        t = self.adapter.sample_t(g, gen, self.cfg)
        eps = torch.randn((g, *shape), generator=gen)
        sl = slice(acc.process_index * n, (acc.process_index + 1) * n)
        return eps[sl].to(acc.device), t[sl]

    def _reference_errors(self, x0, cond, eps, t) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is None:  # LoRA: the base weights are the reference
                model = self.accelerator.unwrap_model(self.policy)
                model.disable_adapters()
                try:
                    return self.adapter.errors(model, x0, cond, eps, t)
                finally:
                    model.enable_adapters()
            device = next(self.reference.parameters()).device
            moved = {k: v.to(device) for k, v in cond.items()}
            return self.adapter.errors(self.reference, x0.to(device), moved, eps.to(device), t).to(x0.device)

    def __call__(self, batch: dict[str, Any], step: int, progress: float) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, adapter = self.cfg, self.adapter
        if cfg.method in PAIR_METHODS:
            x0 = torch.cat([self.latents(batch["winner_image"], batch["winner_id"], batch.get("winner_latent")),
                            self.latents(batch["loser_image"], batch["loser_id"], batch.get("loser_latent"))])
            cond = adapter.encode_prompts(batch["prompt"] * 2, cache=cfg.cache)
            half = len(batch["prompt"])
            fresh, t = self._randomness(step, half, tuple(x0.shape[1:]))
            if cfg.method == "pnapo":
                eps = torch.cat([batch["winner_noise"], batch["loser_noise"]]).to(x0.device, x0.dtype)
                if eps.shape != x0.shape:
                    raise StageError(f"recorded noise of shape {tuple(eps.shape[1:])} does not match latents {tuple(x0.shape[1:])}")
            else:
                eps = torch.cat([fresh, fresh])  # fresh noise shared within each pair
            t = torch.cat([t, t])  # one t per pair, shared by winner and loser
            e = adapter.errors(self.policy, x0, cond, eps, t)
            e_ref = self._reference_errors(x0, cond, eps, t)
            e_w, e_l, r_w, r_l = e[:half], e[half:], e_ref[:half], e_ref[half:]
            if cfg.method == "pnapo":
                beta_t = self.dynamic(batch["gap"].to(e.device), progress)
                loss, metrics = pnapo_loss(e_w, e_l, r_w, r_l, beta_t)
            else:
                loss, metrics = dpo_loss(e_w, e_l, r_w, r_l, self.beta)
                metrics["beta_t"] = self.beta
        else:
            x0 = self.latents(batch["image"], batch["sample_id"], batch.get("latent"))
            cond = adapter.encode_prompts(batch["prompt"], cache=cfg.cache)
            eps, t = self._randomness(step, len(x0), tuple(x0.shape[1:]))
            e = adapter.errors(self.policy, x0, cond, eps, t)
            labels, weights = batch["label"].to(e.device), batch["weight"].to(e.device)
            if cfg.method == "sft":
                e_ref = e.detach()
                loss, metrics = sft_loss(e, labels)
            else:
                e_ref = self._reference_errors(x0, cond, eps, t)
                if cfg.method == "tgo":
                    loss, metrics = tgo_loss(e, e_ref, labels, weights, self.beta, cfg.temperature)
                else:
                    z = self.accelerator.reduce((e_ref - e).mean().detach(), reduction="mean")
                    loss, metrics = kto_loss(e, e_ref, labels, self.beta, cfg.kto_desirable_weight,
                                             cfg.kto_undesirable_weight, reference_point=z)
            metrics["beta_t"] = self.beta
        metrics.update(policy_error=e.mean().item(), reference_error=e_ref.mean().item())
        return loss, metrics


def _checkpoints(directory: Path) -> list[Path]:
    return sorted(directory.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))


def _optimizer(cfg: TrainSection, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise StageError("train.use_8bit_adam needs the bitsandbytes package") from None
        return bnb.optim.AdamW8bit(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def train(manifest: Manifest, *, resume: str | None = None, overwrite: bool = False) -> Path:
    from accelerate import Accelerator
    from accelerate.utils import is_tensorboard_available
    from diffusers.optimization import get_scheduler

    cfg = manifest.require("train")
    stage = Train(manifest)
    out = stage.output
    identity = stage.begin(overwrite=overwrite, extend=resume is not None)  # --resume extends a finished run
    if identity is None:
        return out
    ckpt_dir = out / "checkpoints"
    if resume is None and _checkpoints(ckpt_dir):
        raise StageError(f"{out}: holds checkpoints of an earlier run; use --resume latest or --overwrite")
    data_path = cfg.data or manifest.stage_dir("pair" if cfg.method in PAIR_METHODS else "threshold")
    kind = "pairs" if cfg.method in PAIR_METHODS else "labeled"
    dataset = open_dataset(data_path, kind=kind, verify=False)
    if cfg.method == "pnapo" and "winner_noise" not in dataset.features:
        raise StageError(f"{data_path}: PNAPO needs both samples' recorded prior noise and these pairs have none "
                         "(an external import, or a MaskGIT model, which records seeds only); use method 'dpo' for noise-free pairs")

    tensorboard = is_tensorboard_available()  # log.jsonl always; TensorBoard events too where it is installed
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with="tensorboard" if tensorboard else None, project_dir=str(out))
    if tensorboard:
        accelerator.init_trackers("tensorboard")  # events under <out>/tensorboard/
    torch.manual_seed(cfg.seed)
    pipe, adapter = load_generator(manifest, accelerator.device)
    policy = adapter.denoiser
    reference = None
    if cfg.lora is not None:
        from peft import LoraConfig

        policy.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                                      init_lora_weights=True))
    else:
        ref_device = "cpu" if cfg.reference_device == "cpu" else accelerator.device
        reference = copy.deepcopy(policy).to(ref_device).requires_grad_(False).eval()
        policy.requires_grad_(True)
    if cfg.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(policy)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    schedule = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.lr_schedule]
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    policy, optimizer, lr_scheduler = accelerator.prepare(policy, optimizer, lr_scheduler)

    data = GlobalBatches(data_path, data_columns(cfg.method, set(dataset.features)), cfg.batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, seed=cfg.seed, kind=kind)
    beta = cfg.beta or default_beta(cfg.method, adapter.family)
    dynamic = None
    if cfg.method == "pnapo":
        gap_ref = dataset.stats.get("gap_quantiles", {}).get("p50") or 1.0
        d = cfg.dynamic_beta
        dynamic = DynamicBeta(beta, gap_ref, d.gap, d.schedule, d.gap_strength, d.start, d.ramp)
    step_fn = Step(cfg, adapter, policy, reference, accelerator, beta, dynamic)

    step, micro = 0, 0
    if resume is not None:
        chosen = _checkpoints(ckpt_dir)[-1] if resume == "latest" else Path(resume)
        if not chosen.exists():
            raise StageError(f"{out}: no checkpoint to resume from ({resume})")
        accelerator.load_state(str(chosen))
        state = json.loads((chosen / "trainer_state.json").read_text())
        step, micro = state["step"], state["micro"]
        log.info("train: resuming from %s (step %d)", chosen, step)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "log.jsonl"
    if accelerator.is_main_process:
        kept = [l for l in (log_path.read_text().splitlines() if log_path.exists() and resume else []) if json.loads(l)["step"] <= step]
        log_path.write_text("".join(l + "\n" for l in kept))
        write_json_atomic(out / "train_config.json", manifest.model_dump(mode="json", exclude_none=True))

    per_epoch = data.batches_per_epoch
    epoch, skip = divmod(micro, per_epoch)
    batches = data.epoch(epoch, skip=skip)
    tick, logged = time.perf_counter(), step
    while step < cfg.max_steps:
        try:
            batch = next(batches)
        except StopIteration:
            epoch += 1
            batches = data.epoch(epoch)
            continue
        micro += 1
        with accelerator.accumulate(policy):
            loss, metrics = step_fn(batch, step, step / cfg.max_steps)
            accelerator.backward(loss)
            grad_norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm) if accelerator.sync_gradients else None
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        if not accelerator.sync_gradients:
            continue
        step += 1
        if step % cfg.log_every == 0 or step == cfg.max_steps:  # same steps on every rank: reduce is collective
            now = time.perf_counter()
            record = {
                "step": step, "loss": accelerator.reduce(loss.detach(), reduction="mean").item(), **metrics,
                "grad_norm": float(grad_norm) if grad_norm is not None else None, "lr": lr_scheduler.get_last_lr()[0],
                "samples_per_s": (step - logged) * cfg.batch_size * cfg.gradient_accumulation_steps / max(now - tick, 1e-9),
                "epoch": epoch,
            }
            tick, logged = now, step
            if accelerator.is_main_process:
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                accelerator.log(record, step=step)
        if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
            save_checkpoint(accelerator, ckpt_dir, step, micro, cfg.checkpoint_limit)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = save_final(pipe, adapter, accelerator.unwrap_model(policy), cfg, out)
        stage.seal(identity, {"method": cfg.method, "steps": step, "final": str(final),
                              "format": lora_format(pipe) if cfg.lora else "pipeline", "data": str(data_path)})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def save_checkpoint(accelerator, directory: Path, step: int, micro: int, limit: int) -> None:
    if accelerator.is_main_process:
        existing = _checkpoints(directory)
        for old in existing[: max(0, len(existing) - limit + 1)]:
            shutil.rmtree(old)
    path = directory / f"checkpoint-{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        write_json_atomic(path / "trainer_state.json", {"step": step, "micro": micro})


def save_final(pipe, adapter: Adapter, policy, cfg: TrainSection, out: Path) -> Path:
    """A diffusers pipeline dir (full fine-tune) or LoRA weights for the pipeline's `load_lora_weights`."""
    if cfg.lora is not None:
        from peft.utils import get_peft_model_state_dict

        target = out / "lora"
        if lora_format(pipe) == "lora_adapter":
            policy.save_lora_adapter(str(target))
            return target
        layers = get_peft_model_state_dict(policy)
        type(pipe).save_lora_weights(str(target), **{f"{adapter.denoiser_name}_lora_layers": layers})
        return target
    setattr(pipe, adapter.denoiser_name, policy)
    target = out / "pipeline"
    policy.eval()
    pipe.save_pretrained(str(target))
    return target
