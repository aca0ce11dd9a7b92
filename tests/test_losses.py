"""Each method's loss against a hand-written reference on fixed tensors, and its closed form at initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import TrainSection
from trainer.methods import METHODS, LossContext, Options
from trainer.methods.kto import KTOOptions
from trainer.methods.pnapo import DynamicBeta, PNAPOContext, PNAPOOptions
from trainer.methods.tgo import TGOOptions

E = torch.tensor([0.30, 0.52, 0.41, 0.25])
R = torch.tensor([0.31, 0.50, 0.45, 0.25])
LABELS = torch.tensor([1.0, 0.0, 1.0, 0.0])
WEIGHTS = torch.tensor([1.5, 2.0, 1.0, 3.0])
LABELED = {"label": LABELS, "weight": WEIGHTS}
PAIRS = {"gap": torch.tensor([0.5, 3.0])}  # E and R as two pairs: [winners; losers]


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def pnapo_ctx(beta0: float, progress: float) -> PNAPOContext:
    dynamic = DynamicBeta(beta0, gap_ref=1.0, gap_strength=1.0, start=0.5, ramp=0.5)
    return PNAPOContext(beta=beta0, options=PNAPOOptions(), dynamic=dynamic, progress=progress)


def test_tgo_by_hand():
    loss, m = METHODS["tgo"].loss(E, R, LABELED, LossContext(beta=2.0, options=TGOOptions(temperature=0.1)))
    total = 0.0
    for e, r, l, w in zip(E.tolist(), R.tolist(), LABELS.tolist(), WEIGHTS.tolist(), strict=True):
        s = 2.0 * (r - e) / 0.1
        total += -w * (l * math.log(sig(s)) + (1 - l) * math.log(sig(-s)))
    assert loss.item() == pytest.approx(total / 4, rel=1e-6)
    assert m["implicit_acc"] == 1.0  # s = [+.2, -.4, +.8, 0] against labels [1, 0, 1, 0]


def test_dpo_and_pnapo_by_hand():
    e_w, e_l, r_w, r_l = E[:2].tolist(), E[2:].tolist(), R[:2].tolist(), R[2:].tolist()
    loss, _ = METHODS["dpo"].loss(E, R, PAIRS, LossContext(beta=100.0, options=Options()))
    want = [-math.log(sig(-0.5 * 100 * ((a - b) - (c - d)))) for a, b, c, d in zip(e_w, e_l, r_w, r_l, strict=True)]
    assert loss.item() == pytest.approx(sum(want) / 2, rel=1e-6)
    loss, m = METHODS["pnapo"].loss(E, R, PAIRS, pnapo_ctx(100.0, progress=0.25))
    beta_t = [100 * 0.75 * 2 / 1.5, 100 * 0.75 * 2 / 4]  # gaps 0.5 and 3 around the median 1, a quarter into training
    want = [-math.log(sig(-bt * ((a - b) - (c - d)))) for bt, a, b, c, d in zip(beta_t, e_w, e_l, r_w, r_l, strict=True)]
    assert loss.item() == pytest.approx(sum(want) / 2, rel=1e-6) and m["beta_t"] == pytest.approx(sum(beta_t) / 2)


def test_dynamic_beta_factors():
    gap = torch.tensor([0.5, 1.0, 3.0])
    full = DynamicBeta(100.0, gap_ref=1.0, gap_strength=1.0, start=0.5, ramp=0.5)
    assert torch.allclose(full(gap, 0.0), 100 * 0.5 * torch.tensor([2 / 1.5, 1.0, 2 / 4]))
    assert torch.allclose(full(gap, 0.25), 100 * 0.75 * torch.tensor([2 / 1.5, 1.0, 0.5]))
    assert torch.allclose(full(gap, 0.9), 100 * torch.tensor([2 / 1.5, 1.0, 0.5]))
    static = DynamicBeta(100.0, use_gap=False, use_schedule=False)
    assert torch.equal(static(gap, 0.1), torch.full((3,), 100.0))
    g = full(torch.linspace(0, 5, 20), 1.0)
    assert torch.all(g[1:] < g[:-1])  # decreasing in the gap


def test_beta_defaults_by_family_unless_set():
    for kind, preference in [("rectified_flow", 2000.0), ("diffusion", 5000.0), ("maskgit", 5000.0)]:
        betas = {name: m.context(TrainSection(method=name), kind, {}).beta for name, m in METHODS.items()}
        assert betas == {"tgo": 1.0, "pnapo": preference, "dpo": preference, "kto": preference, "sft": preference}
    assert METHODS["dpo"].context(TrainSection(method="dpo", beta=7.0), "diffusion", {}).beta == 7.0


def test_pnapo_context_scales_beta_to_the_median_gap_of_the_pairs():
    ctx = METHODS["pnapo"].context(TrainSection(method="pnapo"), "rectified_flow", {"gap_quantiles": {"p50": 4.0}})
    assert ctx.dynamic.gap_ref == 4.0 and ctx.dynamic.beta0 == 2000.0
    assert METHODS["pnapo"].context(TrainSection(method="pnapo"), "diffusion", {}).dynamic.gap_ref == 1.0  # no statistics


def test_kto_by_hand():
    ctx = LossContext(beta=10.0, options=KTOOptions(kto_desirable_weight=2.0, kto_undesirable_weight=0.5))
    loss, m = METHODS["kto"].loss(E, R, LABELED, ctx)
    g = (R - E).tolist()
    z = max(0.0, sum(g) / 4)
    want = 0.0
    for gi, l in zip(g, LABELS.tolist(), strict=True):
        sign, lam = (1, 2.0) if l else (-1, 0.5)
        want += lam * (1 - sig(sign * 10.0 * (gi - z)))
    assert loss.item() == pytest.approx(want / 4, rel=1e-6) and m["kto_z"] == pytest.approx(z)


def test_kto_reference_point_is_the_mean_over_processes():
    ctx = LossContext(beta=10.0, options=KTOOptions(), reduce=lambda t: torch.tensor(0.5))  # the other processes' say
    assert METHODS["kto"].loss(E, R, LABELED, ctx)[1]["kto_z"] == 0.5


def test_sft_by_hand():
    loss, m = METHODS["sft"].loss(E, E, LABELED, LossContext(beta=1.0, options=Options()))
    assert loss.item() == pytest.approx((0.30 + 0.41) / 2) and m["positives"] == 2


def test_closed_forms_at_init_with_gradients():
    e = E.clone().requires_grad_(True)
    ref = E.detach()
    for name, ctx, want in [
        ("tgo", LossContext(beta=1.0, options=TGOOptions()), WEIGHTS.mean().item() * math.log(2)),
        ("dpo", LossContext(beta=5000.0, options=Options()), math.log(2)),
        ("pnapo", pnapo_ctx(2000.0, progress=0.3), math.log(2)),
        ("kto", LossContext(beta=2000.0, options=KTOOptions()), 0.5),
    ]:
        e.grad = None
        loss, _ = METHODS[name].loss(e, ref, {**LABELED, **PAIRS}, ctx)
        loss.backward()
        assert loss.item() == pytest.approx(want, rel=1e-6), name
        assert e.grad is not None and e.grad.abs().sum() > 0, name
