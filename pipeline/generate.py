"""Generate stage: K images per prompt from a diffusers pipeline, each with its recorded prior noise.

Prompts are cut into fixed units of `prompts_per_shard` prompts; unit i writes shard i. The plan depends only
on the prompt file and the manifest, so a rerun skips the shards already written and ends with exactly the
dataset an uninterrupted run writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets import Features

from pipeline.config import GenerateSection, Manifest
from pipeline.errors import StageError
from pipeline.executor import Resources, UnitWorker, run_units
from pipeline.families import family_of
from pipeline.prompts import Prompt
from pipeline.schema import noise_to_arrow, samples_features
from pipeline.seeds import prior_noise, sample_id, sample_seed
from pipeline.shards import PROGRESS_DIR, ShardRecord, ShardWriter, StageOutput, shard_name, write_json_atomic
from pipeline.stage import DONE, Generate, Written

log = logging.getLogger("tauflow")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_TOKENIZER_SIZE = 16  # a failed offline load yields ~2 tokens


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_tokenizers(pipe: Any, ref: str) -> None:
    """Offline, `from_pretrained(<hub id>)` can return an empty tokenizer instead of failing: refuse it."""
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tok = getattr(pipe, name, None)
        if tok is not None and len(tok) < MIN_TOKENIZER_SIZE:
            raise StageError(f"{ref}: {name} has only {len(tok)} tokens: its files were not found (offline?)")


def model_parts(ref: str, lora_base: str | None = None) -> tuple[str, str | None]:
    """What a model reference loads: (the pipeline's weights, a LoRA dir to apply on them, or None).

    A finished train output is named by its train/<method> dir (its done.json says where the result is and
    which format), or by the pipeline/ or lora/ dir inside it. A LoRA's base is the model its training started
    from, recorded in done.json (`base`; older runs: their train_config.json); `lora_base` stands in for a
    LoRA dir that records none (eval.models naming a LoRA trained elsewhere). Anything else loads as it is."""
    path = Path(ref).expanduser()
    record = next((d / DONE for d in (path, path.parent) if (d / DONE).is_file()), None)
    if record is None:
        is_lora = path.is_dir() and not (path / "model_index.json").exists() and any(path.glob("*.safetensors"))
        if not is_lora:
            return ref, None
        if lora_base is None:
            raise StageError(f"{ref}: a LoRA dir without a done.json beside it: its base model is unknown")
        return lora_base, ref
    done = json.loads(record.read_text())
    final = Path(done["final"])
    if record.parent == path:
        path = final
    elif path.resolve() != final.resolve():  # a folder inside a train output other than its result
        raise StageError(f"{ref}: not the result of {record.parent} (its done.json names {final})")
    if done["format"] == "pipeline":
        return str(path), None
    if "base" in done:
        return done["base"], str(path)
    trained = json.loads((record.parent / "train_config.json").read_text())  # written before `base` was recorded
    return trained["train"].get("model") or trained["generate"]["model"], str(path)


def merge_lora(pipe: Any) -> Any:
    """Fold a loaded LoRA into the denoiser's weights (a model to train a new LoRA on, or to stack one on)."""
    denoiser = family_of(pipe).denoiser
    if getattr(denoiser, "peft_config", None):
        denoiser.fuse_lora()
        denoiser.unload_lora()
    return pipe


def load_model(ref: str, *, revision: str | None = None, variant: str | None = None, torch_dtype: str = "float32",
               local_files_only: bool = False, trust_remote_code: bool = False, device: str = "cpu",
               lora_base: str | None = None) -> Any:
    """`DiffusionPipeline.from_pretrained` for a hub id or local dir, with the empty-tokenizer guard; a trained
    LoRA (see `model_parts`) is loaded onto its base, itself merged first where it is a LoRA (rounds stack them)."""
    import diffusers
    import transformers

    weights, lora = model_parts(ref, lora_base)
    if lora is not None:
        pipe = merge_lora(load_model(weights, revision=revision, variant=variant, torch_dtype=torch_dtype,
                                     local_files_only=local_files_only, trust_remote_code=trust_remote_code, device=device))
        family_of(pipe).load_lora(lora)
        return pipe
    ref = weights

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        pipe = diffusers.DiffusionPipeline.from_pretrained(
            ref, revision=revision, variant=variant, dtype=DTYPES[torch_dtype],
            local_files_only=local_files_only, trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as err:
        raise StageError(f"{ref}: cannot load the pipeline: {err}") from None
    check_tokenizers(pipe, ref)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_pipeline(cfg: GenerateSection, device: str) -> Any:
    """The generate section's pipeline: `load_model` plus the scheduler override."""
    import diffusers

    pipe = load_model(cfg.model, revision=cfg.revision, variant=cfg.variant, torch_dtype=cfg.torch_dtype,
                      local_files_only=cfg.local_files_only, trust_remote_code=cfg.trust_remote_code, device=device)
    if cfg.scheduler:
        scheduler_cls = getattr(diffusers, cfg.scheduler, None)
        if scheduler_cls is None:
            raise StageError(f"generate.scheduler: diffusers has no scheduler class '{cfg.scheduler}'")
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    return pipe


def encode_png(image: Any) -> bytes:
    """PNG at zlib level 1 (PIL releases the GIL while it compresses: encoder threads run in parallel)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def record_runtime(out_dir: str | Path, index: int, **info: str) -> None:
    """What a worker ran unit `index` on (its device, its score dtype), under `.progress/`. Written before the
    shard commits, so every completed shard has one; the stage copies them into its manifest stats."""
    write_json_atomic(Path(out_dir) / PROGRESS_DIR / f"runtime-{index:05d}.json", info)


def recorded_runtime(out_dir: str | Path, num_shards: int, key: str) -> str | list[str | None] | None:
    """`key` of the shards' runtime records: one value when every shard agrees, else the list by shard index
    (a run resumed on another machine); None for shards written before runtimes were recorded."""
    values = []
    for i in range(num_shards):
        path = Path(out_dir) / PROGRESS_DIR / f"runtime-{i:05d}.json"
        values.append(json.loads(path.read_text()).get(key) if path.exists() else None)
    return values[0] if len(set(values)) == 1 else values


class SampleGenerator:
    """A loaded pipeline that turns (prompt, sample_index) rows into a samples table."""

    def __init__(self, cfg: GenerateSection, run_seed: int, pipe: Any = None):
        self.cfg, self.run_seed = cfg, run_seed
        self.pipe = pipe if pipe is not None else load_pipeline(cfg, pick_device(cfg.device))
        self.family = family_of(self.pipe, height=cfg.height, width=cfg.width, guidance_scale=cfg.guidance_scale)
        self.features = samples_features(self.family.noise_shape, cfg.noise_dtype)
        # PNG encoding: one thread per CPU the worker holds, overlapping the next batch's pipeline call
        self.encoder = ThreadPoolExecutor(max_workers=max(1, int(cfg.cpus_per_worker)), thread_name_prefix="png")

    def images(self, prompts: list[Prompt], seeds: list[int], noise: torch.Tensor | None,
               final_latents: list | None = None) -> list[Any]:
        """Images for one batch; the sampler's final latents are appended to `final_latents` when given."""
        cfg = self.cfg
        capture = self.family.capture_final_latents(final_latents) if final_latents is not None else {}
        negatives = [p.negative_prompt or cfg.negative_prompt or "" for p in prompts]
        out = self.pipe(
            prompt=[p.text for p in prompts],
            negative_prompt=negatives if any(negatives) else None,
            num_inference_steps=cfg.num_inference_steps,
            guidance_scale=cfg.guidance_scale,
            height=cfg.height,
            width=cfg.width,
            output_type="pil",
            **cfg.pipeline_kwargs,
            **self.family.call_kwargs(noise, seeds),
            **capture,
        )
        return out.images

    def table(self, prompts: list[Prompt]) -> pa.Table:
        """The samples table of `prompts` (K rows per prompt, in prompt order)."""
        return pa.concat_tables(self.tables(prompts))

    def tables(self, prompts: list[Prompt]) -> Iterator[pa.Table]:
        """`table`, as one table per pipeline batch. A batch's PNGs encode on the encoder threads while the next
        batch generates, so a batch's table comes out once the following batch has been generated."""
        cfg, k = self.cfg, self.cfg.images_per_prompt
        rows = [(p, i) for p in prompts for i in range(k)]
        seeds = [sample_seed(self.run_seed, p.prompt_id, i) for p, i in rows]
        shape, noise_dtype = self.family.noise_shape, DTYPES[cfg.noise_dtype]
        noise = torch.stack([prior_noise(s, shape, noise_dtype) for s in seeds]) if shape else None
        step = self.family.max_batch or cfg.batch_size
        pending = None
        for lo in range(0, len(rows), step):
            batch_noise = noise[lo : lo + step] if noise is not None else None
            finals: list = []
            images = self.images([p for p, _ in rows[lo : lo + step]], seeds[lo : lo + step], batch_noise, finals)
            pngs = [self.encoder.submit(encode_png, im) for im in images]
            if pending is not None:
                yield self._batch_table(*pending)
            pending = (rows[lo : lo + step], seeds[lo : lo + step], batch_noise, finals, pngs)
        if pending is not None:
            yield self._batch_table(*pending)

    def _batch_table(self, rows: list[tuple[Prompt, int]], seeds: list[int], noise: torch.Tensor | None,
                     finals: list, pngs: list[Future]) -> pa.Table:
        cfg, n = self.cfg, len(rows)
        columns: dict[str, Any] = {
            "sample_id": [sample_id(self.run_seed, p.prompt_id, i) for p, i in rows],
            "prompt_id": [p.prompt_id for p, _ in rows],
            "prompt": [p.text for p, _ in rows],
            "negative_prompt": [p.negative_prompt or cfg.negative_prompt for p, _ in rows],
            "sample_index": [i for _, i in rows],
            "seed": seeds,
            "image": [{"bytes": f.result(), "path": None} for f in pngs],
        }
        if noise is not None:
            columns["noise"] = noise_to_arrow(noise.numpy(), self.features["noise"])
            columns["latent"] = noise_to_arrow(torch.cat(finals).to(noise.dtype).numpy(), self.features["latent"])
        columns.update(
            model=[cfg.model] * n,
            revision=[cfg.revision] * n,
            scheduler=[type(self.pipe.scheduler).__name__] * n,
            num_inference_steps=[cfg.num_inference_steps] * n,
            guidance_scale=[cfg.guidance_scale] * n,
            height=[cfg.height] * n,
            width=[cfg.width] * n,
            torch_dtype=[cfg.torch_dtype] * n,
        )
        return pa.table(columns, schema=self.features.arrow_schema)


class GenerateWorker(UnitWorker):
    """Ray Data / local worker: loads the pipeline once, writes one shard per unit of prompts.

    The shard is streamed: each batch's rows are written as a row group by a background thread while the next
    batch generates, so after the last pipeline call only that batch's PNGs and row group remain. A failed
    write fails the unit (its result is awaited before the commit), and the shard is recorded complete only
    by the commit, after every row group has been written."""

    def __init__(self, cfg: dict[str, Any], run_seed: int, out_dir: str, max_retries: int = 2,
                 threads: float | None = None):
        super().__init__(out_dir, max_retries, threads)
        section = GenerateSection.model_validate(cfg)
        self.device = pick_device(section.device)
        self.generator = SampleGenerator(section, run_seed)

    def process(self, unit: dict[str, Any]) -> ShardRecord:
        prompts = [Prompt(*p) for p in unit["prompts"]]
        schema = self.generator.features.arrow_schema
        # the writer closes after the thread's last write (or, on an error, is discarded after it)
        with ShardWriter(self.out_dir, unit["unit"], schema) as writer, ThreadPoolExecutor(max_workers=1) as background:
            writing = None
            for table in self.generator.tables(prompts):
                if writing is not None:
                    writing.result()  # a failed write fails the unit here, one batch later at most
                writing = background.submit(writer.write, table)
            if writing is not None:
                writing.result()
            record_runtime(self.out_dir, unit["unit"], device=self.device)
            return writer.commit()


def plan_units(prompts: list[Prompt], per_unit: int) -> list[dict[str, Any]]:
    return [
        {"unit": i, "prompts": [[p.prompt_id, p.text, p.negative_prompt] for p in prompts[lo : lo + per_unit]]}
        for i, lo in enumerate(range(0, len(prompts), per_unit))
    ]


def run_generate(manifest: Manifest, *, overwrite: bool = False, executor: str | None = None) -> Path:
    """The generate stage (pipeline.stage.Generate): skipped when complete, resumed when started."""
    return Generate(manifest).execute(overwrite=overwrite, executor=executor)


def write_samples(stage: Generate, out: StageOutput, executor: str | None) -> Written:
    """Generate the shards not yet written, on the run's executor."""
    cfg, run = stage.cfg, stage.manifest.run
    prompts, prompt_stats = stage.prompts
    units = plan_units(prompts, cfg.prompts_per_shard)
    pending = [units[i] for i in out.pending(len(units))]
    if len(pending) < len(units):
        log.info("generate: resuming, %d of %d shards already written", len(units) - len(pending), len(units))
    res = Resources(
        executor or run.executor, run.ray_address, cfg.num_workers, cfg.cpus_per_worker, cfg.gpus_per_worker,
        cfg.max_retries,
    )
    kwargs = {"cfg": cfg.model_dump(mode="json"), "run_seed": run.seed, "out_dir": str(out.path)}
    run_units(GenerateWorker, kwargs, pending, res, desc="generate", rows_of=lambda u: len(u["prompts"]) * cfg.images_per_prompt)
    stats = {"prompts": prompt_stats, "prompts_sha256": prompts_sha256(prompts), "images_per_prompt": cfg.images_per_prompt,
             "device": recorded_runtime(out.path, len(units), "device")}
    return Written(len(units), _features_from_shard(out.path), stats)


def prompts_sha256(prompts: list[Prompt]) -> str:
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(f"{p.prompt_id}\t{p.text}\t{p.negative_prompt}\n".encode())
    return digest.hexdigest()


def _features_from_shard(path: Path):
    """The samples features as written by the workers (the noise shape is only known once a model is loaded)."""
    return Features.from_arrow_schema(pq.read_schema(path / shard_name(0)))


def generated_on(ds: Any, shard: int) -> str | None:
    """The device shard `shard` of `ds` was generated on: the samples dataset's recorded device, reached through
    a scored or labeled dataset's inputs (their shard i comes from its shard i); None when not recorded."""
    from pipeline.shards import open_dataset

    while ds.kind != "samples":
        inputs = ds.manifest.get("inputs") or []
        if not inputs or not (Path(inputs[0]["path"]) / "manifest.json").exists():
            return None
        ds = open_dataset(inputs[0]["path"])
    device = ds.stats.get("device")
    return device[shard] if isinstance(device, list) else device


def regenerate(dataset_dir: str | Path, sample_id_: str, device: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-run one row from its stored noise (or seed); returns (stored image, regenerated image) as uint8.

    It runs on the device the row was generated on (recorded by the generate stage; CPU for datasets from
    before that was recorded) unless `device` says otherwise: kernels differ across devices by a uint8 level
    or so, while the same device reproduces the image exactly. A recorded device this machine lacks is an error
    that says how to override it."""
    from pipeline.readers import decode_png
    from pipeline.shards import open_dataset

    ds = open_dataset(dataset_dir, kind=("samples", "scored", "labeled"), verify=True)
    generate_cfg = ds.manifest["config"].get("generate")
    if generate_cfg is None:
        raise StageError(f"{ds.path}: its manifest has no generate config to regenerate from")
    row, shard = None, -1
    for shard in range(len(ds.shard_paths)):
        table = ds.read_shard(shard)
        hit = table.filter(pa.compute.equal(table["sample_id"], sample_id_))
        if hit.num_rows:
            row = hit
            break
    if row is None:
        raise StageError(f"{dataset_dir}: no sample with sample_id {sample_id_}")
    recorded = generated_on(ds, shard)
    device = pick_device(device or recorded or "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        origin = f"sample {sample_id_} was generated on {recorded}" if recorded == device else f"device {device} requested"
        raise StageError(f"{ds.path}: {origin}, but CUDA is not available here; pass --device cpu to regenerate on "
                         "the CPU (expect about one uint8 level of difference)")
    log.info("regenerate: %s on %s (generated on %s)", sample_id_, device, recorded or "an unrecorded device")
    cfg = GenerateSection.model_validate({**generate_cfg, "device": device})
    gen = SampleGenerator(cfg, run_seed=0)
    prompt = Prompt(row["prompt_id"][0].as_py(), row["prompt"][0].as_py(), row["negative_prompt"][0].as_py())
    seed = row["seed"][0].as_py()
    noise = None
    if "noise" in row.column_names:
        from pipeline.schema import noise_from_arrow

        noise = torch.from_numpy(noise_from_arrow(row["noise"], gen.family.noise_shape).copy())
    image = gen.images([prompt], [seed], noise)[0]
    stored = decode_png(row["image"][0].as_py()["bytes"])
    return stored, np.asarray(image.convert("RGB"))
