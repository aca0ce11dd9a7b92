"""Small synthetic datasets of each kind, written through the real StageOutput writer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from pipeline.schema import labeled_features, noise_to_arrow, pairs_features, samples_features, scored_features
from pipeline.shards import StageOutput

NOISE_SHAPE = (4, 8, 8)


def png(rng: np.random.Generator, size: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def samples_table(n: int, seed: int = 0, prompts: int = 3) -> tuple[pa.Table, np.ndarray]:
    rng = np.random.default_rng(seed)
    features = samples_features(NOISE_SHAPE, "float16")
    noise = rng.standard_normal((n, *NOISE_SHAPE)).astype(np.float16)
    cols = {
        "sample_id": [f"s{seed}-{i}" for i in range(n)],
        "prompt_id": [f"p{i % prompts}" for i in range(n)],
        "prompt": [f"prompt {i % prompts}" for i in range(n)],
        "negative_prompt": [None] * n,
        "sample_index": [i // prompts for i in range(n)],
        "seed": list(range(n)),
        "image": [{"bytes": png(rng), "path": None} for _ in range(n)],
        "noise": noise_to_arrow(noise, features["noise"]),
        "latent": noise_to_arrow((noise * 0.5).astype(np.float16), features["latent"]),
        "model": ["m"] * n, "revision": [None] * n, "scheduler": ["S"] * n, "num_inference_steps": [2] * n,
        "guidance_scale": [1.0] * n, "height": [8] * n, "width": [8] * n, "torch_dtype": ["float32"] * n,
    }
    return pa.table(cols, schema=features.arrow_schema), noise


def kind_table(kind: str, n: int, seed: int = 0) -> pa.Table:
    table, noise = samples_table(n, seed)
    if kind == "samples":
        return table
    scores = np.random.default_rng(seed + 1).standard_normal(n).astype(np.float32)
    features = scored_features(samples_features(NOISE_SHAPE), ["a"])
    table = table.append_column("score_a", pa.array(scores)).cast(features.arrow_schema)
    if kind == "scored":
        return table
    if kind == "labeled":
        features = labeled_features(features)
        extra = {"score": scores, "tau": np.zeros(n, np.float32), "label": (scores >= 0).astype(np.int8),
                 "weight": (1 + 5 * np.abs(scores)).astype(np.float32)}
        for name, values in extra.items():
            table = table.append_column(name, pa.array(values))
        return table.cast(features.arrow_schema)
    features = pairs_features(samples_features(NOISE_SHAPE)["noise"])
    half = n // 2
    w, lo = table.slice(0, half), table.slice(half, half)
    cols = {
        "pair_id": [f"pair{i}" for i in range(half)], "prompt_id": w["prompt_id"], "prompt": w["prompt"],
        "winner_id": w["sample_id"], "loser_id": lo["sample_id"], "winner_image": w["image"], "loser_image": lo["image"],
        "winner_noise": w["noise"], "loser_noise": lo["noise"], "winner_latent": w["latent"], "loser_latent": lo["latent"],
        "winner_seed": w["seed"], "loser_seed": lo["seed"],
        "winner_score": pa.array(np.ones(half, np.float32)), "loser_score": pa.array(np.zeros(half, np.float32)),
        "gap": pa.array(np.ones(half, np.float32)),
    }
    return pa.table(cols, schema=features.arrow_schema)


def write_kind(path: Path, kind: str, shards: int = 2, rows: int = 6) -> Path:
    tables = [kind_table(kind, rows, seed=i) for i in range(shards)]
    out = StageOutput(path, kind=kind, stage="test", config_hash="h")
    for i, t in enumerate(tables):
        out.write(i, t)
    from datasets import Features

    out.finalize(num_shards=shards, features=Features.from_arrow_schema(tables[0].schema), config={"kind": kind})
    return path


def scored_dataset(path: Path, per_prompt: list[dict[str, list[float]]], shards: list[list[int]] | None = None) -> Path:
    """A scored dataset: per_prompt[i] maps reward -> the K scores of prompt i; `shards` lists prompt indices per
    shard (default: one shard). Sample ids are f"p{i}-{k}"; noise is random and recorded."""
    rewards = list(per_prompt[0])
    features = scored_features(samples_features(NOISE_SHAPE), rewards)
    shards = shards or [list(range(len(per_prompt)))]
    out = StageOutput(path, kind="scored", stage="score", config_hash="scored")
    for s, prompt_indices in enumerate(shards):
        rows = [(i, k) for i in prompt_indices for k in range(len(per_prompt[i][rewards[0]]))]
        table, _ = samples_table(len(rows), seed=s)
        table = table.set_column(0, "sample_id", pa.array([f"p{i}-{k}" for i, k in rows]))
        table = table.set_column(1, "prompt_id", pa.array([f"p{i}" for i, _ in rows]))
        table = table.set_column(2, "prompt", pa.array([f"prompt {i}" for i, _ in rows]))
        table = table.set_column(4, "sample_index", pa.array([k for _, k in rows], pa.int32()))
        for r in rewards:
            table = table.append_column(f"score_{r}", pa.array([per_prompt[i][r][k] for i, k in rows], pa.float32()))
        out.write(s, table.cast(features.arrow_schema))
    out.finalize(num_shards=len(shards), features=features, config={})
    return path
