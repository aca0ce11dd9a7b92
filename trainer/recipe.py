"""The training recipe: one explicit loop for TGO, PNAPO, Diffusion-DPO, Diffusion-KTO and SFT.

Read top to bottom: load the generator with its frozen weights at train.frozen_dtype -> pick its family adapter
-> set up policy and reference (the loaded denoiser and an fp32 copy of it, or the base weights under a
disabled LoRA adapter) -> stream batches -> per step, draw the step's randomness from (seed, step) for the
*global* batch, compute policy and reference errors on the same noisy inputs under the same autocast, apply the
method's loss -> log, checkpoint, save. Randomness and data depend only on (seed, step), so `--resume latest`
continues exactly and W processes match one process on the same global batch.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from pipeline.config import Manifest, TrainSection
from pipeline.errors import StageError
from pipeline.faults import crash_point
from pipeline.families import Family, family_of
from pipeline.shards import Dataset, open_dataset, write_json_atomic
from pipeline.stage import Train
from trainer.data import GlobalBatches
from trainer.methods import METHODS, Method
from trainer.methods.base import MaskedMean, Metrics

log = logging.getLogger("tauflow")
DATA_STAGES = {"labeled": "threshold", "pairs": "pair"}  # the stage that writes each kind of training data


def training_data(manifest: Manifest, method: Method) -> tuple[Path, Dataset]:
    """The dataset `method` trains on (train.data, or this run's labeled or pairs dataset), opened and checked."""
    path = manifest.require("train").data or manifest.stage_dir(DATA_STAGES[method.data])
    dataset = open_dataset(path, kind=method.data, verify=False)
    method.check_data(path, dataset)
    return path, dataset


def check_latent_shape(manifest: Manifest, data_path: Path, dataset: Dataset, method: Method, family: Family) -> None:
    """Recorded latents must have the shape the model takes at the run's resolution: another run's latents (say
    16x16 into a model generating 8x8) would otherwise train without a word and teach it the wrong size."""
    feature = dataset.features.get(method.samples[0].latent)
    gen = manifest.generate
    if feature is None or gen is None or family.noise_shape is None:
        return
    if tuple(feature.shape) != tuple(family.noise_shape):
        raise StageError(f"{data_path}: recorded latents of shape {tuple(feature.shape)}, but the model takes "
                         f"{tuple(family.noise_shape)} at generate.height x width = {gen.height}x{gen.width}; "
                         "train on data generated at the model's resolution")


def load_generator(manifest: Manifest, device: torch.device) -> tuple[Any, Family]:
    """The pipeline training starts from (train.model, else generate.model: a hub id, a pipeline dir or a
    finished train output); a LoRA result is merged into its base, so that a new LoRA trains on top of it."""
    from pipeline.generate import load_model, merge_lora

    cfg = manifest.require("train")
    gen = manifest.generate
    ref = cfg.model or (gen.model if gen else None)
    if ref is None:
        raise StageError(f"{manifest.source}: train.model is not set and there is no generate.model to start from")
    pipe = load_model(ref, torch_dtype=cfg.frozen_torch_dtype, local_files_only=gen.local_files_only if gen else False,
                      device=str(device))
    merge_lora(pipe)
    text_kwargs = {}
    if gen and "max_sequence_length" in gen.pipeline_kwargs:
        text_kwargs["max_sequence_length"] = gen.pipeline_kwargs["max_sequence_length"]
    sampled = {"guidance_scale": gen.guidance_scale, "height": gen.height, "width": gen.width} if gen else {}
    family = family_of(pipe, text_kwargs=text_kwargs, **sampled)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.requires_grad_(False).eval()
    return pipe, family


def policy_and_reference(cfg: TrainSection, adapter: Family, method: Method, device: torch.device,
                         other: torch.nn.Module | None = None) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The trained policy and its frozen reference, made to compute the same function at initialisation.

    The loaded denoiser holds the frozen weights at train.frozen_dtype. Full fine-tune: the policy is a copy
    upcast to fp32 master weights, which are exactly the loaded values, and the loaded denoiser becomes the
    reference. Below fp32 its Linear and Conv weights stay at frozen_dtype: autocast runs those layers in its
    own dtype whatever their weights' dtype, on the same values for both. Every other weight (norms, embeddings,
    tables multiplied in their own dtype) is upcast, since those ops follow the weight's dtype; it is a small
    share of the parameters. Placed on the CPU, the reference is stored there and computes on `device`:
    accelerate's offload hooks materialise each layer's weights there in fp32 for that layer's forward only.
    So both forwards run the same ops on the same values in the same dtypes. LoRA: fp32 adapters on the frozen
    base; the base under the disabled adapter is the reference (returned as None). `other`: a reference that is
    another model (train.reference: base in a later round), loaded at frozen_dtype and made to compute the same
    way. Methods without a reference train the denoiser upcast in place."""
    frozen = adapter.denoiser
    if cfg.lora is not None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        frozen.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=cfg.lora.target_modules,
                                      init_lora_weights=True))
        cast_training_params(frozen, dtype=torch.float32)
        return frozen, _computing_like_fp32(other, cfg, device) if other is not None else None
    own_copy = method.needs_reference and other is None
    policy = (copy.deepcopy(frozen) if own_copy else frozen).float().requires_grad_(True)
    setattr(adapter.pipe, adapter.denoiser_name, policy)  # the pipeline holds the trained denoiser, as it is saved
    if not method.needs_reference:
        return policy, None
    return policy, _computing_like_fp32(frozen if own_copy else other, cfg, device)


def _computing_like_fp32(frozen: torch.nn.Module, cfg: TrainSection, device: torch.device) -> torch.nn.Module:
    """A frozen reference stored at frozen_dtype that computes, under the run's autocast, what its fp32 copy would
    (see policy_and_reference)."""
    frozen.requires_grad_(False).eval()
    if cfg.reference_device == "cpu":
        from accelerate import cpu_offload

        stored = {k: v.to("cpu") for k, v in frozen.state_dict().items()}  # frozen_dtype, on the CPU
        cpu_offload(frozen, execution_device=device, offload_buffers=True, state_dict=stored)
        frozen.float()  # the offloaded tensors are now meta placeholders: fp32 ones make each layer load in fp32
    else:
        frozen.to(device)
        for module in frozen.modules():
            if not isinstance(module, AUTOCAST_LAYERS):
                _upcast_own(module)
    return frozen


AUTOCAST_LAYERS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)  # run in autocast's dtype


def _upcast_own(module: torch.nn.Module) -> None:
    """fp32 for the parameters and floating buffers a module holds itself (not its children's)."""
    for tensors in (module._parameters, module._buffers):
        for name, tensor in tensors.items():
            if tensor is not None and tensor.is_floating_point() and tensor.dtype != torch.float32:
                tensors[name] = (torch.nn.Parameter(tensor.data.float(), requires_grad=False)
                                 if isinstance(tensor, torch.nn.Parameter) else tensor.float())


def autocast(cfg: TrainSection, device: torch.device) -> contextlib.AbstractContextManager:
    """The run's autocast, entered around the policy's and the reference's forwards alike. accelerate's own
    wraps only the prepared policy, and leaves fp16 on a CPU out."""
    if cfg.mixed_precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float16)


def load_reference(manifest: Manifest, device: torch.device | str) -> torch.nn.Module | None:
    """The frozen denoiser of train.reference where it is another model than the start one (`base` in a later
    round: the run's generate.model, even when the policy trains a LoRA on the merged previous round);
    None where the start model is the reference (a frozen copy of it, or the base under a disabled LoRA)."""
    from pipeline.generate import load_model, merge_lora

    ref = Train(manifest).reference_model
    if ref is None:
        return None
    gen = manifest.generate
    cfg = manifest.require("train")
    pipe = merge_lora(load_model(ref, torch_dtype=cfg.frozen_torch_dtype, local_files_only=gen.local_files_only if gen else False,
                                 device=str(device)))
    return family_of(pipe).denoiser


class Latents:
    """VAE latents of training images, cached by sample id (the VAE is frozen). Cached images are encoded one
    at a time so that a latent does not depend on the batch that first met it (exact resumes)."""

    def __init__(self, adapter: Family, enabled: bool):
        self.adapter, self.enabled, self.cache = adapter, enabled, {}

    def __call__(self, pixels: torch.Tensor, ids: list[str], recorded: torch.Tensor | None = None) -> torch.Tensor:
        """`recorded`: the sampler's own final latents, exact where re-encoding the image is not."""
        if recorded is not None:
            return recorded.to(self.adapter.pipe.device, non_blocking=True)
        if not self.enabled:
            return self._encode(pixels)
        for i, k in enumerate(ids):
            if k not in self.cache:
                self.cache[k] = self._encode(pixels[i : i + 1])[0]
        return torch.stack([self.cache[k] for k in ids])

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents in fp32 like recorded ones, whatever the VAE's dtype (token ids stay integers)."""
        z = self.adapter.encode_images(pixels)
        return z.float() if z.is_floating_point() else z


class Step:
    """Computes one method's loss on one batch; holds the policy, the reference and the adapter."""

    def __init__(self, cfg: TrainSection, adapter: Family, policy, reference, accelerator, data_stats: dict[str, Any]):
        self.cfg, self.adapter, self.policy, self.reference = cfg, adapter, policy, reference
        self.accelerator, self.method = accelerator, METHODS[cfg.method]
        self.ctx = replace(self.method.context(cfg, adapter.kind, data_stats), reduce=self._mean_over_processes)
        self.latents = Latents(adapter, cfg.cache)

    def _mean_over_processes(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="mean")

    def _randomness(self, step: int, n: int, shape: tuple[int, ...], per_row: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Fresh noise (`per_row` per row, laid out [first samples; second samples; ...]) and t drawn for the
        global batch at `step`; this process's `n` rows of them."""
        acc = self.accelerator
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        g = max(self.cfg.batch_size, n * acc.num_processes)
        t = self.adapter.sample_t(g, gen, self.cfg)
        eps = torch.randn((g, per_row, *shape), generator=gen)
        sl = slice(acc.process_index * n, (acc.process_index + 1) * n)
        return eps[sl].transpose(0, 1).reshape(-1, *shape).to(acc.device), t[sl]

    def _recorded_noise(self, batch: dict[str, Any], x0: torch.Tensor) -> torch.Tensor:
        eps = torch.cat([batch[s.noise].to(x0.device, x0.dtype, non_blocking=True) for s in self.method.samples])
        if eps.shape != x0.shape:
            raise StageError(f"recorded noise of shape {tuple(eps.shape[1:])} does not match latents {tuple(x0.shape[1:])}")
        return eps

    def _reference_errors(self, x0, cond, eps, t) -> torch.Tensor:
        with torch.no_grad():
            if self.reference is None:  # LoRA: the base weights are the reference
                model = self.accelerator.unwrap_model(self.policy)
                model.disable_adapters()
                try:
                    return self.adapter.errors(model, x0, cond, eps, t)
                finally:
                    model.enable_adapters()
            return self.adapter.errors(self.reference, x0, cond, eps, t)

    def __call__(self, batch: dict[str, Any], step: int, progress: float) -> tuple[torch.Tensor, Metrics]:
        method, adapter, samples = self.method, self.adapter, self.method.samples
        # latents and conditioning of every sample of the rows; pairs are laid out [winners; losers]
        x0 = torch.cat([self.latents(batch.get(s.image), batch[s.id], batch.get(s.latent)) for s in samples])
        cond = adapter.encode_prompts(batch["prompt"] * len(samples), cache=self.cfg.cache)
        # noise and t: one t per row, shared by its samples; the noise recorded, fresh and shared, or fresh per sample
        noise = method.noise(self.ctx)
        fresh, t = self._randomness(step, len(batch["prompt"]), tuple(x0.shape[1:]), len(samples) if noise == "independent" else 1)
        eps = (self._recorded_noise(batch, x0) if noise == "recorded" else
               fresh if noise == "independent" else torch.cat([fresh] * len(samples)))
        t = torch.cat([t] * len(samples))
        # policy and reference errors on the same noisy inputs under the same autocast, then the method's loss
        with autocast(self.cfg, self.accelerator.device):
            e = adapter.errors(self.policy, x0, cond, eps, t)
            e_ref = self._reference_errors(x0, cond, eps, t) if method.needs_reference else e.detach()
        loss, metrics = method.loss(e, e_ref, batch, replace(self.ctx, progress=progress))
        metrics.update(policy_error=e.detach().mean(), reference_error=e_ref.mean())
        return loss, metrics


def as_floats(metrics: Metrics) -> dict[str, float]:
    """A step's metrics as floats, read on logged steps only: every tensor in one device-to-host copy, masked
    means evaluated (fp32 -> fp64 is exact, so the floats are those `.item()` gives)."""
    tensors = {k: v for k, v in metrics.items() if isinstance(v, torch.Tensor)}
    values = dict(zip(tensors, torch.stack([v.double() for v in tensors.values()]).tolist())) if tensors else {}
    return {k: values[k] if k in values else v.item() if isinstance(v, MaskedMean) else v for k, v in metrics.items()}


def _checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first. One is complete once renamed from its temporary name, which happens
    after its trainer_state.json is written, so a save killed midway is never listed."""
    found = [p for p in directory.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()]
    return sorted((p for p in found if (p / "trainer_state.json").exists()), key=lambda p: int(p.name.split("-")[1]))


def _resume_point(ckpt_dir: Path, resume: str) -> Path:
    """The checkpoint `--resume` names: the newest complete one for 'latest', else the given directory."""
    complete = _checkpoints(ckpt_dir)
    if resume == "latest" and not complete:
        raise StageError(f"{ckpt_dir}: no complete checkpoint to resume from; run without --resume to start afresh")
    chosen = complete[-1] if resume == "latest" else Path(resume)
    if not (chosen / "trainer_state.json").exists():
        raise StageError(f"{chosen}: not a complete checkpoint (no trainer_state.json); use --resume latest")
    return chosen


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
    chosen = _resume_point(ckpt_dir, resume) if resume is not None else None  # checked before any model loads
    method = METHODS[cfg.method]
    data_path, dataset = training_data(manifest, method)

    tensorboard = is_tensorboard_available()  # log.jsonl always; TensorBoard events too where it is installed
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available(),
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              log_with="tensorboard" if tensorboard else None, project_dir=str(out))
    torch.manual_seed(cfg.seed)
    pipe, adapter = load_generator(manifest, accelerator.device)
    check_latent_shape(manifest, data_path, dataset, method, adapter)
    if tensorboard:
        accelerator.init_trackers("tensorboard")  # events under <out>/tensorboard/
    other = load_reference(manifest, accelerator.device) if method.needs_reference else None  # train.reference
    policy, reference = policy_and_reference(cfg, adapter, method, accelerator.device, other)
    if cfg.gradient_checkpointing:
        adapter.enable_gradient_checkpointing(policy)
    policy.train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = _optimizer(cfg, params)
    schedule = {"constant": "constant_with_warmup", "cosine": "cosine", "linear": "linear"}[cfg.lr_schedule]
    lr_scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)
    policy, optimizer, lr_scheduler = accelerator.prepare(policy, optimizer, lr_scheduler)

    data = GlobalBatches(data_path, method.columns(set(dataset.features)), cfg.batch_size, rank=accelerator.process_index,
                         world_size=accelerator.num_processes, seed=cfg.seed, kind=method.data)
    step_fn = Step(cfg, adapter, policy, reference, accelerator, dataset.stats)

    step, micro = 0, 0
    if chosen is not None:
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
                "step": step, "loss": accelerator.reduce(loss.detach(), reduction="mean").item(), **as_floats(metrics),
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
                              "format": adapter.lora_format if cfg.lora else "pipeline", "data": str(data_path),
                              "base": stage.start_model, "reference": stage.reference_model or stage.start_model})
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def save_checkpoint(accelerator, directory: Path, step: int, micro: int, limit: int) -> None:
    """Save under a temporary name, rename it into place once complete, and only then prune the oldest: a kill
    at any point leaves the newest complete checkpoint usable by `--resume latest`."""
    final = directory / f"checkpoint-{step}"
    partial = directory / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)  # left by a save that was killed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(partial / "trainer_state.json", {"step": step, "micro": micro})
        crash_point(f"checkpoint-saving:{step}")
        if final.exists():  # the same step saved by an earlier run: moved aside, then replaced
            stale = directory / f".{final.name}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(partial, final)
            shutil.rmtree(stale)
        else:
            os.replace(partial, final)
        for old in _checkpoints(directory)[:-limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def save_final(pipe, family: Family, policy, cfg: TrainSection, out: Path) -> Path:
    """A diffusers pipeline dir (full fine-tune) or LoRA weights in the family's format."""
    if cfg.lora is not None:
        target = out / "lora"
        family.save_lora(policy, target)
        return target
    setattr(pipe, family.denoiser_name, policy)
    target = out / "pipeline"
    policy.eval()
    pipe.save_pretrained(str(target))
    return target
