"""Shared fixtures: offline settings, tiny saved pipelines, prompt files, manifests, a local Ray instance."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before any Hugging Face library reads it
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)

from tests.tiny_models import save_tiny  # noqa: E402

PROMPTS = ["a red cat", "a blue dog", "the photo of a digit", "a handwritten seven", "an orange fox"]


def pytest_collection_modifyitems(config, items):
    """Tests marked `gpu` run only where CUDA is present; elsewhere they are skipped with the reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu test: CUDA is not available on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(family) -> directory of a saved tiny pipeline (built once per session)."""
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = save_tiny(family, tmp_path_factory.mktemp(f"model-{family}"))
        return built[family]

    return get


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


def write_manifest(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def generate_manifest(tmp_path, prompts_file, tiny_model):
    """generate_manifest(family, **generate_overrides) -> path of a manifest with a small generate stage."""

    def make(family: str = "sd3", run: dict | None = None, **generate) -> Path:
        data = {
            "run": {"name": "t", "output_dir": str(tmp_path / "out"), "seed": 0, "executor": "local", **(run or {})},
            "generate": {
                "model": str(tiny_model(family)), "prompts": str(prompts_file), "images_per_prompt": 2,
                "num_inference_steps": 2, "height": 16, "width": 16, "batch_size": 4, "prompts_per_shard": 2,
                "guidance_scale": 2.0, **generate,
            },
        }
        return write_manifest(tmp_path / f"{family}.yaml", data)

    return make


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_rewards(tmp_path_factory) -> dict[str, dict]:
    """kind -> reward spec (without name) of a tiny saved model of that kind."""
    from tests.tiny_rewards import reward_specs

    return reward_specs(tmp_path_factory.mktemp("rewards"))
