"""The family registry: every tiny pipeline has its family, an unknown pipeline is refused by name, and no code
outside the registry dispatches on pipeline class names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from tests.tiny_models import BUILDERS

from pipeline.errors import StageError
from pipeline.families import FAMILIES, family_of

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "pipeline" / "families" / "__init__.py"
KINDS = {"sd": "diffusion", "sdxl": "diffusion", "sd3": "rectified_flow", "flux": "rectified_flow", "amused": "maskgit"}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_registry_covers_every_tiny_pipeline(name):
    family = family_of(BUILDERS[name](), height=16, width=16)
    assert family.kind == KINDS[name]
    assert (family.noise_shape is not None) == (name != "amused")
    assert family.denoiser is getattr(family.pipe, family.denoiser_name)


def test_unknown_pipeline_is_refused_by_name():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)
    supported = ", ".join(sorted(FAMILIES))
    with pytest.raises(StageError, match=f"^unsupported pipeline class DDPMPipeline; supported: {supported}$"):
        family_of(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()))


def _names_pipeline(node: ast.AST) -> bool:
    return any(isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.endswith("Pipeline")
               or isinstance(n, ast.Name) and n.id.endswith("Pipeline")
               or isinstance(n, ast.Attribute) and (n.attr.endswith("Pipeline") or n.attr == "__name__")
               for n in ast.walk(node))


def class_name_checks(source: str) -> list[int]:
    """Lines that branch or dispatch on a pipeline class: comparisons with a class name or `__name__`,
    isinstance/issubclass against a pipeline class, dict keys naming pipeline classes, lookups by `__name__`."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            hit = any(_names_pipeline(n) for n in (node.left, *node.comparators))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("isinstance", "issubclass"):
            hit = len(node.args) == 2 and _names_pipeline(node.args[1])
        elif isinstance(node, ast.Dict):
            hit = any(k is not None and _names_pipeline(k) for k in node.keys)
        elif isinstance(node, ast.Subscript):
            hit = _names_pipeline(node.slice)
        else:
            hit = False
        if hit:
            lines.append(node.lineno)
    return lines


def test_only_the_registry_names_pipeline_classes():
    planted = 'if type(pipe).__name__ == "FluxPipeline":\n    pass\nx = {"AmusedPipeline": 1}\nisinstance(p, d.SDXLPipeline)\n'
    assert class_name_checks(planted) == [1, 3, 4]  # the scan does see such checks
    assert class_name_checks(REGISTRY.read_text())  # ... and the registry's table
    found = {}
    for package in ("pipeline", "trainer", "rewards", "benchmarks"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path != REGISTRY and (lines := class_name_checks(path.read_text())):
                found[str(path.relative_to(ROOT))] = lines
    assert found == {}
