"""Each loss against a hand-written reference on fixed tensors, and its closed form at initialisation."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import DynamicBeta, dpo_loss, kto_loss, pnapo_loss, sft_loss, tgo_loss

E = torch.tensor([0.30, 0.52, 0.41, 0.25])
R = torch.tensor([0.31, 0.50, 0.45, 0.25])
LABELS = torch.tensor([1.0, 0.0, 1.0, 0.0])
WEIGHTS = torch.tensor([1.5, 2.0, 1.0, 3.0])


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_tgo_by_hand():
    loss, m = tgo_loss(E, R, LABELS, WEIGHTS, beta=2.0, temperature=0.1)
    total = 0.0
    for e, r, l, w in zip(E.tolist(), R.tolist(), LABELS.tolist(), WEIGHTS.tolist(), strict=True):
        s = 2.0 * (r - e) / 0.1
        total += -w * (l * math.log(sig(s)) + (1 - l) * math.log(sig(-s)))
    assert loss.item() == pytest.approx(total / 4, rel=1e-6)
    assert m["implicit_acc"] == 1.0  # s = [+.2, -.4, +.8, 0] against labels [1, 0, 1, 0]


def test_dpo_and_pnapo_by_hand():
    e_w, e_l, r_w, r_l = E[:2], E[2:], R[:2], R[2:]
    loss, _ = dpo_loss(e_w, e_l, r_w, r_l, beta=100.0)
    want = [-math.log(sig(-0.5 * 100 * ((a - b) - (c - d)))) for a, b, c, d in zip(e_w.tolist(), e_l.tolist(), r_w.tolist(), r_l.tolist(), strict=True)]
    assert loss.item() == pytest.approx(sum(want) / 2, rel=1e-6)
    beta_t = torch.tensor([30.0, 70.0])
    loss, m = pnapo_loss(e_w, e_l, r_w, r_l, beta_t)
    want = [-math.log(sig(-bt * ((a - b) - (c - d)))) for bt, a, b, c, d in zip(beta_t.tolist(), e_w.tolist(), e_l.tolist(), r_w.tolist(), r_l.tolist(), strict=True)]
    assert loss.item() == pytest.approx(sum(want) / 2, rel=1e-6) and m["beta_t"] == pytest.approx(50.0)


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


def test_kto_by_hand():
    loss, m = kto_loss(E, R, LABELS, beta=10.0, desirable_weight=2.0, undesirable_weight=0.5)
    g = (R - E).tolist()
    z = max(0.0, sum(g) / 4)
    want = 0.0
    for gi, l in zip(g, LABELS.tolist(), strict=True):
        sign, lam = (1, 2.0) if l else (-1, 0.5)
        want += lam * (1 - sig(sign * 10.0 * (gi - z)))
    assert loss.item() == pytest.approx(want / 4, rel=1e-6) and m["kto_z"] == pytest.approx(z)


def test_sft_by_hand():
    loss, m = sft_loss(E, LABELS)
    assert loss.item() == pytest.approx((0.30 + 0.41) / 2) and m["positives"] == 2


def test_closed_forms_at_init_with_gradients():
    e = E.clone().requires_grad_(True)
    ref = E.detach()
    for name, fn, want in [
        ("tgo", lambda: tgo_loss(e, ref, LABELS, WEIGHTS, 1.0, 0.001)[0], WEIGHTS.mean().item() * math.log(2)),
        ("dpo", lambda: dpo_loss(e[:2], e[2:], ref[:2], ref[2:], 5000.0)[0], math.log(2)),
        ("pnapo", lambda: pnapo_loss(e[:2], e[2:], ref[:2], ref[2:], torch.tensor([2000.0, 900.0]))[0], math.log(2)),
        ("kto", lambda: kto_loss(e, ref, LABELS, 2000.0)[0], 0.5),
    ]:
        e.grad = None
        loss = fn()
        loss.backward()
        assert loss.item() == pytest.approx(want, rel=1e-6), name
        assert e.grad is not None and e.grad.abs().sum() > 0, name
