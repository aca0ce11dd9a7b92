"""Arrow schemas of the four dataset kinds, declared as Hugging Face `Features`.

Declaring them as HF features puts the `huggingface` entry in the Parquet schema metadata, so
`datasets.load_dataset("parquet", ...)` decodes images to PIL and noise to shaped tensors without tauflow.
Noise is an `Array3D` (C, H, W) in the model's *unpacked* latent layout; its Arrow storage is nested lists,
which `noise_to_arrow`/`noise_from_arrow` build and flatten without Python loops.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
from datasets import Array3D, Features, Image, Value

KINDS = ("samples", "scored", "labeled", "pairs")

GENERATION_FEATURES = {
    "model": Value("string"),
    "revision": Value("string"),
    "scheduler": Value("string"),
    "num_inference_steps": Value("int32"),
    "guidance_scale": Value("float32"),
    "height": Value("int32"),
    "width": Value("int32"),
    "torch_dtype": Value("string"),
}


def samples_features(noise_shape: Sequence[int] | None, noise_dtype: str = "float16") -> Features:
    """noise_shape None: the family has no continuous prior noise (MaskGIT); the seed alone reproduces it."""
    features = {
        "sample_id": Value("string"),
        "prompt_id": Value("string"),
        "prompt": Value("string"),
        "negative_prompt": Value("string"),
        "sample_index": Value("int32"),
        "seed": Value("int64"),
        "image": Image(),
    }
    if noise_shape is not None:
        features["noise"] = Array3D(tuple(noise_shape), noise_dtype)
        features["latent"] = Array3D(tuple(noise_shape), noise_dtype)  # the sampler's final latent
    features.update(GENERATION_FEATURES)
    return Features(features)


def score_column(reward: str) -> str:
    return f"score_{reward}"


def scored_features(samples: Features, rewards: Sequence[str]) -> Features:
    extra = {score_column(r): Value("float32") for r in rewards if score_column(r) not in samples}
    return Features({**samples, **extra})


def labeled_features(scored: Features) -> Features:
    return Features(
        {**scored, "score": Value("float32"), "tau": Value("float32"), "label": Value("int8"), "weight": Value("float32")}
    )


def pairs_features(noise: Array3D | None) -> Features:
    features = {
        "pair_id": Value("string"),
        "prompt_id": Value("string"),
        "prompt": Value("string"),
        "winner_id": Value("string"),
        "loser_id": Value("string"),
        "winner_image": Image(),
        "loser_image": Image(),
    }
    if noise is not None:
        features["winner_noise"] = noise
        features["loser_noise"] = noise
        features["winner_latent"] = noise
        features["loser_latent"] = noise
    features.update(
        {
            "winner_seed": Value("int64"),
            "loser_seed": Value("int64"),
            "winner_score": Value("float32"),
            "loser_score": Value("float32"),
            "gap": Value("float32"),
        }
    )
    return Features(features)


def noise_to_arrow(noise: np.ndarray, feature: Array3D) -> pa.Array:
    """(N, C, H, W) array -> Array3D column, built from offsets (no per-element Python work)."""
    shape = tuple(feature.shape)
    if noise.ndim != 4 or tuple(noise.shape[1:]) != shape:
        raise ValueError(f"noise of shape {noise.shape[1:]} does not match the schema's {shape}")
    n, c, h, w = noise.shape
    values = pa.array(np.ascontiguousarray(noise, dtype=feature.dtype).reshape(-1))
    rows = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c * h * w + 1, w, dtype=np.int32)), values)
    planes = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c * h + 1, h, dtype=np.int32)), rows)
    storage = pa.ListArray.from_arrays(pa.array(np.arange(0, n * c + 1, c, dtype=np.int32)), planes)
    ext_type = feature()  # datasets' Array3DExtensionType
    return pa.ExtensionArray.from_storage(ext_type, storage.cast(ext_type.storage_type))


def noise_from_arrow(column: pa.Array | pa.ChunkedArray, shape: Sequence[int]) -> np.ndarray:
    """Array3D column -> (N, C, H, W) numpy array (copy-free where Arrow allows)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if isinstance(column, pa.ExtensionArray):
        column = column.storage
    if column.null_count:
        raise ValueError("noise column has missing values")
    flat = column.flatten().flatten().flatten()
    return flat.to_numpy(zero_copy_only=False).reshape(len(column), *shape)
