"""Policy and reference compute the same function at initialisation, in every precision and reference placement.

Each case runs the real `train` for one step and reads the first logged loss, computed before any update, on a
tiny pipeline whose every parameter (norm weights and biases included) was moved away from its init, so that
any rounding difference between the policy's and the reference's forwards shows. The closed forms at init:
ln 2 (DPO, PNAPO), mean(w) ln 2 (TGO), mean(lambda) / 2 (KTO). SD's UNet is the main case; aMUSEd, FLUX and SD3
add ops whose dtype follows the weights' rather than autocast's (a token embedding, RMSNorm's weight product).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch

from tests.train_harness import prepare_run
from trainer.data import GlobalBatches
from trainer.recipe import train

PLACEMENTS = {"full": {}, "cpu": {"reference_device": "cpu"}, "lora": {"lora": {"rank": 2}}}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
KTO_WEIGHTS = {"kto_desirable_weight": 2.0, "kto_undesirable_weight": 0.5}


def _autocast_supports(device: str, precision: str) -> bool:
    """Whether torch autocasts to `precision` on `device` (an unsupported dtype only warns and disables it)."""
    if precision == "no":
        return True
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.autocast(device, dtype=DTYPES[precision]):
            return torch.is_autocast_enabled(device)


def _cases(methods: list[str], precisions: list[str], placements: list[str], device: str) -> list:
    return [pytest.param(m, p, where, marks=pytest.mark.skipif(not _autocast_supports(device, p),
                                                                 reason=f"{device} autocast has no {p}"))
            for m in methods for p in precisions for where in placements]


# DPO in every precision and placement; the other losses with a reference at bf16, full fine-tune
CPU_CASES = _cases(["dpo"], ["no", "bf16", "fp16"], list(PLACEMENTS), "cpu") + _cases(["tgo", "kto", "pnapo"], ["bf16"], ["full"], "cpu")
CUDA_CASES = _cases(["dpo", "tgo", "kto", "pnapo"], ["no", "bf16", "fp16"], list(PLACEMENTS), "cuda")


def _perturbed(model: Path, directory: Path) -> Path:
    """`model` with 0.05 N(0, 1) added to every parameter of every component, saved as a new pipeline."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                for p in component.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=gen))
    pipe.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("precision-run")
    return prepare_run(root, _perturbed(tiny_model("sd"), root / "perturbed"))


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tiny_model):
    """family -> a perturbed tiny run of that family (built on first use)."""
    made = {}

    def get(family: str):
        if family not in made:
            root = tmp_path_factory.mktemp(f"precision-run-{family}")
            made[family] = prepare_run(root, _perturbed(tiny_model(family), root / "perturbed"))
        return made[family]

    return get


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """accelerate keeps one mixed precision per process (why a manifest cannot vary it per method); the cases
    here each choose their own."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def _closed_form(manifest) -> float:
    """The method's loss at initialisation on the first batch of its data."""
    cfg = manifest.train
    if cfg.method in ("dpo", "pnapo"):
        return math.log(2)
    first = next(GlobalBatches(cfg.data, ["label", "weight"], cfg.batch_size, seed=cfg.seed,
                               kind="labeled").epoch(0))
    if cfg.method == "tgo":
        return first["weight"].double().mean().item() * math.log(2)
    lam = torch.where(first["label"] > 0.5, cfg.kto_desirable_weight, cfg.kto_undesirable_weight)
    return lam.double().mean().item() / 2


def _first_record(run_dir, tmp_path: Path, method: str, precision: str, placement: str) -> tuple[dict, float]:
    options = KTO_WEIGHTS if method == "kto" else {}
    manifest = run_dir(f"{method}-{precision}-{placement}.yaml", method=method, mixed_precision=precision, max_steps=1,
                       log_every=1, output_dir=str(tmp_path / "out"), **PLACEMENTS[placement], **options)
    out = train(manifest)
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    return first, _closed_form(manifest)


def _assert_reference_is_policy(run_dir, tmp_path, method, precision, placement) -> None:
    record, closed_form = _first_record(run_dir, tmp_path, method, precision, placement)
    assert record["policy_error"] == record["reference_error"]
    assert abs(record["loss"] - closed_form) < 1e-6, (record["loss"], closed_form)


@pytest.mark.parametrize(("method", "precision", "placement"), CPU_CASES)
def test_reference_computes_the_policy_at_init(run_dir, tmp_path, method, precision, placement):
    _assert_reference_is_policy(run_dir, tmp_path, method, precision, placement)


@pytest.mark.parametrize("family", ["amused", "flux", "sd3"])  # token embeddings, RMSNorms, modulation tables
def test_reference_computes_the_policy_at_init_in_every_family(family_runs, tmp_path, family):
    _assert_reference_is_policy(family_runs(family), tmp_path, "dpo", "bf16", "full")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("method", "precision", "placement"), CUDA_CASES)
def test_reference_computes_the_policy_at_init_on_cuda(run_dir, tmp_path, method, precision, placement):
    _assert_reference_is_policy(run_dir, tmp_path, method, precision, placement)
