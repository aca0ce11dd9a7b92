"""Trainer step time vs a bare PyTorch loop (same tiny SD3, batch and DPO loss), and loader throughput."""

from __future__ import annotations

import copy
import json
import statistics
import time
from pathlib import Path

import yaml


def _run(tmp: Path) -> Path:
    from tests.tiny_models import save_tiny

    from pipeline.config import load_manifest
    from pipeline.generate import run_generate
    from pipeline.pair import run_pair
    from pipeline.score import run_score

    save_tiny("sd3", tmp / "model")
    (tmp / "p.txt").write_text("\n".join(f"object {i}" for i in range(32)) + "\n")
    data = {
        "run": {"name": "b", "output_dir": str(tmp / "out"), "executor": "local"},
        "generate": {"model": str(tmp / "model"), "prompts": str(tmp / "p.txt"), "images_per_prompt": 4,
                     "num_inference_steps": 2, "height": 32, "width": 32, "batch_size": 16},
        "score": {"rewards": [{"name": "bright", "kind": "tests.plugin_rewards:Brightness"}]},
        "pair": {"reward": "bright", "strategy": "all"},
        "train": {"method": "dpo", "batch_size": 8, "max_steps": 40, "learning_rate": 1e-5, "log_every": 1,
                  "checkpoint_every": 1000},
    }
    path = tmp / "m.yaml"
    path.write_text(yaml.safe_dump(data))
    m = load_manifest(path)
    for stage in (run_generate, run_score, run_pair):
        stage(m)
    return path


def bench_train(tmp: Path) -> dict:
    import torch

    from pipeline.config import load_manifest
    from trainer.data import GlobalBatches
    from trainer.methods import METHODS, LossContext, Options
    from trainer.recipe import load_generator, train

    torch.set_num_threads(2)
    manifest = load_manifest(_run(tmp))
    out = train(manifest)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][5:]  # after warm-up
    step_s = [manifest.train.batch_size / r["samples_per_s"] for r in records]

    # The bare loop: the same model, batch size and loss on batches already decoded and encoded in memory.
    pipe, adapter = load_generator(manifest, torch.device("cpu"))
    policy = adapter.denoiser.requires_grad_(True).train()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-5)
    pairs = manifest.stage_dir("pair")
    from pipeline.shards import open_dataset

    dpo = METHODS["dpo"]
    cols = dpo.columns(set(open_dataset(pairs).features))
    batch = next(GlobalBatches(pairs, cols, 8).epoch(0))
    x0 = torch.cat([batch["winner_latent"], batch["loser_latent"]])
    cond = adapter.encode_prompts(batch["prompt"] * 2)
    gen = torch.Generator().manual_seed(0)
    bare_s = []
    for i in range(len(records) + 5):
        start = time.perf_counter()
        eps = torch.randn(x0[:8].shape, generator=gen).repeat(2, 1, 1, 1)
        t = adapter.sample_t(8, gen, manifest.train).repeat(2)
        e = adapter.errors(policy, x0, cond, eps, t)
        with torch.no_grad():
            r = adapter.errors(reference, x0, cond, eps, t)
        loss, _ = dpo.loss(e, r, batch, LossContext(beta=2000.0, options=Options()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if i >= 5:
            bare_s.append(time.perf_counter() - start)

    # The loader alone: rows/s it can deliver vs rows/s training consumes.
    data = GlobalBatches(pairs, cols, 8)
    start, rows = time.perf_counter(), 0
    for epoch in range(3):
        for b in data.epoch(epoch):
            rows += len(b["prompt"])
    loader_rows_s = rows / (time.perf_counter() - start)
    med_step, med_bare = statistics.median(step_s), statistics.median(bare_s)
    return {"step_ms": 1000 * med_step, "bare_step_ms": 1000 * med_bare,
            "ratio": {"median": med_step / med_bare, "min": min(step_s) / max(bare_s), "max": max(step_s) / min(bare_s)},
            "loader_rows_per_s": loader_rows_s, "consumed_rows_per_s": 8 / med_step,
            "loader_512px": bench_loader_512(tmp / "pairs512")}


def _pairs_512(path: Path, pairs: int) -> float:
    """A pairs dataset of `pairs` rows whose images are 512 px PNGs; returns the mean PNG size in KiB."""
    import io

    import numpy as np
    import pyarrow as pa
    from PIL import Image
    from synthetic import kind_table

    from pipeline.shards import StageOutput

    rng = np.random.default_rng(0)

    def png() -> bytes:  # smooth colour fields plus grain: compresses about like a generated photo
        coarse = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(coarse).resize((512, 512), Image.BICUBIC)).astype(np.int16)
        img = np.clip(img + rng.integers(-12, 12, img.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        return buf.getvalue()

    table = kind_table("pairs", 2 * pairs)
    images = {c: [{"bytes": png(), "path": None} for _ in range(pairs)] for c in ("winner_image", "loser_image")}
    for name, values in images.items():
        table = table.set_column(table.schema.get_field_index(name), table.schema.field(name), pa.array(values, table.schema.field(name).type))
    out = StageOutput(path, kind="pairs", stage="bench", config_hash="h")
    out.write(0, table)
    from datasets import Features

    out.finalize(num_shards=1, features=Features.from_arrow_schema(table.schema), config={})
    return float(np.mean([len(v["bytes"]) for v in images["winner_image"]]) / 1024)


def bench_loader_512(path: Path, pairs: int = 48, step_s: float = 0.3) -> dict:
    """Batches of 8 pairs (16 PNGs at 512 px): seconds per batch decoded inline vs the time a training loop
    whose step takes `step_s` (a GPU step, simulated by sleeping) waits for each batch with prefetching."""
    from trainer.data import GlobalBatches

    kib = _pairs_512(path, pairs)
    cols = ["pair_id", "prompt", "winner_image", "loser_image", "winner_latent", "loser_latent"]
    inline = GlobalBatches(path, cols, 8, workers=1, prefetch=1)
    start = time.perf_counter()
    n = sum(1 for _ in inline.epoch(0))
    decode_s = (time.perf_counter() - start) / n
    waits = []
    batches = GlobalBatches(path, cols, 8).epoch(0)
    while True:
        start = time.perf_counter()
        if next(batches, None) is None:
            break
        waits.append(time.perf_counter() - start)
        time.sleep(step_s)
    return {"png_kib": kib, "decode_s_per_batch": decode_s, f"wait_s_per_batch_at_{step_s}s_steps": statistics.median(waits[1:]),
            "first_batch_s": waits[0]}
