"""Tests for CoherentStrongReg and its functional kernels.

The descent criterion is checked against hand-computed first-order loss changes, the update
rules against numpy and SGD's own weight decay, the optimizer hooks against the manual calls
(closures, foreach/fused optimizers, clipping, GradScaler), and the gate's behaviour on small
trainings (it stays on while learning converges; it switches off when training collapses).
"""

from __future__ import annotations

import copy
import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import needs_fsdp2, run_distributed
from torch_recal import (
    Always,
    Budget,
    CoherentStrongReg,
    DescentGate,
    RatioRule,
    compression_report,
)
from torch_recal.functional import coherence_statistics, group_soft_threshold_, soft_threshold_

ROOT = Path(__file__).resolve().parents[1]
RATIO_RULE = {"criterion": "ratio", "l1_mode": "subgradient", "warmup": 0}  # the first default
SAME = DescentGate(progress="same-batch")  # the gate measured with the step's own gradient


def _params_with_grads(weights, grads):
    params = [nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


def _mlp(seed=0, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, hidden), nn.ReLU(), nn.Linear(hidden, 3))


def _batches(n=8, seed=1):
    """A learnable toy problem: the label is the argmax of a fixed linear map of x."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))
    xs = [torch.randn(32, 6, generator=g) for _ in range(n)]
    return [(x, (x @ a).argmax(1)) for x in xs]


def _manual_step(model, opt, reg, x, y):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    reg.step()
    opt.step()
    reg.after_step()


# ----------------------------------------------------------------------------- descent criterion
def _soft(w, t):
    return np.sign(w) * np.maximum(np.abs(w) - t, 0.0)


def test_descent_progress_and_cost_match_hand_computation():
    # plain SGD: progress = <g, w - w1> = lr |g|^2; cost = <g, soft(w1, lr * s) - w1>
    w = [np.array([[0.5, -0.02], [0.3, 0.0]]), np.array([[-1.0, 0.2, 0.004]])]
    g = [np.array([[0.4, -0.1], [-0.2, 0.3]]), np.array([[0.5, -0.6, 0.1]])]
    lr, s = 0.1, 0.05
    params = _params_with_grads([torch.tensor(x) for x in w], [torch.tensor(x) for x in g])
    opt = torch.optim.SGD(params, lr=lr)
    reg = CoherentStrongReg(params, strength=s, optimizer=opt, warmup=0, criterion=SAME)
    reg.step()
    opt.step()
    reg.after_step()
    progress = sum(lr * (gi**2).sum() for gi in g)
    after = [wi - lr * gi for wi, gi in zip(w, g, strict=True)]
    cost = sum((gi * (_soft(ai, lr * s) - ai)).sum() for gi, ai in zip(g, after, strict=True))
    entry = reg.history[0]
    assert entry["progress"] == pytest.approx(progress, rel=1e-12)
    assert entry["cost"] == pytest.approx(cost, rel=1e-12)
    assert entry["undo"] == pytest.approx(cost / progress, rel=1e-12)
    for p, a in zip(params, after, strict=True):  # and the prox step itself
        np.testing.assert_allclose(p.detach().numpy(), _soft(a, lr * s), rtol=0, atol=1e-15)


def test_next_batch_progress_matches_hand_computation():
    # step 0's progress is measured at step 1 with step 1's gradient g1 (independent of the
    # step): <g1, w0 - w1> + cost0, with w1 = soft(w0 - lr g0, lr s) and the cost of step 0's
    # proximal step measured with g0 (it does not depend on g0's noise to first order)
    w0 = np.array([[0.5, -0.02, 0.3], [0.0, -1.0, 0.2]])
    g0 = np.array([[0.4, -0.1, -0.2], [0.3, 0.5, -0.6]])
    g1 = np.array([[-0.3, 0.2, 0.1], [0.05, 0.4, -0.2]])
    lr, s = 0.1, 0.05
    (p,) = _params_with_grads([torch.tensor(w0)], [torch.tensor(g0)])
    opt = torch.optim.SGD([p], lr=lr)
    reg = CoherentStrongReg([p], strength=s, optimizer=opt, warmup=0, freeze_below=None,
                            criterion=DescentGate())  # fmt: skip
    assert reg.criterion == DescentGate(progress="next-batch")  # the gate's default progress
    for g in (g0, g1):
        p.grad = torch.tensor(g)
        reg.step()
        opt.step()
        reg.after_step()
    a0 = w0 - lr * g0
    w1 = _soft(a0, lr * s)
    cost0 = (g0 * (w1 - a0)).sum()
    progress0 = (g1 * (w0 - w1)).sum() + cost0
    first, second = reg.history
    assert first["cost"] == pytest.approx(cost0, rel=1e-12)
    assert first["progress"] == pytest.approx(progress0, rel=1e-12)
    assert first["undo"] == pytest.approx(cost0 / progress0, rel=1e-12)
    assert second["progress"] is None  # measured at the next step
    state = reg.state_dict()
    assert state["measured_step"] == 1 and state["measured_applied"] is True
    a1 = w1 - lr * g1
    np.testing.assert_allclose(state["last_step"][0].numpy(), w1 - _soft(a1, lr * s), atol=1e-15)


def _equilibrium_run(progress: str, sigma: float, steps: int = 60) -> list[bool]:
    """Start at the exact proximal-gradient equilibrium of ``1/2 |w - a|^2 + s |w|_1``
    (``w* = soft(a, s)``, plain SGD), with gradient noise of sd ``sigma``: the regulariser
    undoes all the optimizer's progress there (undo = 1 in expectation)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(40, 50, generator=g, dtype=torch.float64)
    s = 0.5
    p = nn.Parameter(torch.sign(a) * (a.abs() - s).clamp_min(0))
    opt = torch.optim.SGD([p], lr=0.1)
    gate = DescentGate(progress=progress)
    reg = CoherentStrongReg([p], strength=s, optimizer=opt, warmup=0, criterion=gate,
                            freeze_below=None)  # fmt: skip
    active = []
    for _ in range(steps):
        p.grad = (p.detach() - a) + sigma * torch.randn(40, 50, generator=g, dtype=torch.float64)
        reg.step()
        opt.step()
        reg.after_step()
        active.append(reg.is_active)
    return active


@pytest.mark.parametrize("sigma", [0.0, 0.1, 1.0, 3.0])
def test_at_an_l1_equilibrium_the_next_batch_gate_switches_off_whatever_the_noise(sigma):
    active = _equilibrium_run("next-batch", sigma)
    assert not all(active[:3])  # off as soon as the first measurement is in
    if sigma >= 1.0:  # the same-batch progress carries the step's own noise: it stays on
        assert all(_equilibrium_run("same-batch", sigma))


def _drive(undos, *, strength=0.1, lr=0.1, smoothing=0.0, **kw):
    """Drive the descent gate (same-batch progress) with chosen undone fractions: with plain
    SGD and ``g = -c sign(w)`` on weights far from zero, ``progress = lr c^2 n`` and
    ``cost = lr s c n``, so ``undo = s / c``."""
    p = nn.Parameter(torch.full((3, 4), 10.0, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=lr)
    gate = DescentGate(progress="same-batch", smoothing=smoothing)
    kw = {"warmup": 0, "criterion": gate, **kw}
    reg = CoherentStrongReg([p], strength=strength, optimizer=opt, **kw)
    seen = []
    for undo in undos:
        p.grad = -(strength / undo) * torch.ones(3, 4, dtype=torch.float64)
        reg.step()
        opt.step()
        reg.after_step()
        seen.append(reg.is_active)
    return seen, reg


def test_descent_gate_switches_off_above_max_undo_and_back_on_below_resume():
    seen, reg = _drive([0.1, 0.4, 0.6, 0.4, 0.3, 0.2, 0.45, 0.9])
    # off above 0.5; stays off at 0.4 and 0.3 (>= resume 0.25); on at 0.2; on at 0.45
    assert seen == [True, True, False, False, False, True, True, False]
    assert [h["undo"] for h in reg.history] == pytest.approx(
        [0.1, 0.4, 0.6, 0.4, 0.3, 0.2, 0.45, 0.9]
    )
    assert [h["active"] for h in reg.history] == [True, True, True, False, False, False, True, True]


def test_descent_gate_smooths_progress_and_cost_separately():
    seen, reg = _drive([0.1, 0.1, 0.9], smoothing=0.5)
    # cost and progress are averaged, not their ratio: EMA(cost) / EMA(progress)
    c = [0.1 / u for u in (0.1, 0.1, 0.9)]
    prog = [0.1 * ci**2 * 12 for ci in c]
    cost = [0.1 * 0.1 * ci * 12 for ci in c]
    ema_p = 0.5 * (0.5 * prog[0] + 0.5 * prog[1]) + 0.5 * prog[2]
    ema_c = 0.5 * (0.5 * cost[0] + 0.5 * cost[1]) + 0.5 * cost[2]
    state = reg.state_dict()
    assert state["progress_ema"] == pytest.approx(ema_p)
    assert state["cost_ema"] == pytest.approx(ema_c)
    assert seen[-1] == (ema_c <= 0.5 * ema_p)


def _measured(history, key):
    """The entries' ``key`` where the measurement is complete (the next-batch progress of
    the last step is measured at the next one)."""
    return [h[key] for h in history if h.get("progress") is not None]


@pytest.mark.parametrize("progress", ["same-batch", "next-batch"])
def test_descent_criterion_does_not_depend_on_the_number_of_parameters(progress):
    """Two independent copies of a network trained side by side on the same data give the
    same undone fraction and the same decisions as one copy (sums double, ratios do not)."""

    def run(copies):
        models = [_mlp(hidden=32) for _ in range(copies)]
        params = [p for m in models for p in m.parameters()]
        opt = torch.optim.SGD(params, lr=0.5)
        named = [(f"{i}.{n}", p) for i, m in enumerate(models) for n, p in m.named_parameters()]
        gate = DescentGate(progress=progress)
        reg = CoherentStrongReg(named, strength=0.1, optimizer=opt, warmup=0, criterion=gate)
        for x, y in _batches(12):
            opt.zero_grad()
            sum(nn.functional.cross_entropy(m(x), y) for m in models).backward()
            reg.step()
            opt.step()
            reg.after_step()
        return reg.history

    one, two = run(1), run(2)
    assert [h["active"] for h in one] == [h["active"] for h in two]
    assert len({h["active"] for h in one}) == 2  # the gate acted
    assert _measured(two, "undo") == pytest.approx(_measured(one, "undo"), rel=1e-4)
    doubled = [2 * p for p in _measured(one, "progress")]
    assert _measured(two, "progress") == pytest.approx(doubled, rel=1e-4)


@pytest.mark.parametrize("progress", ["same-batch", "next-batch"])
def test_descent_criterion_is_invariant_to_the_gradient_scale(progress):
    """A loss scaled by k (a GradScaler's scale, a sum instead of a mean) scales the
    gradient, the optimizer's step and both first-order changes alike: for SGD the undone
    fraction only depends on the step, so scale the lr by 1/k to keep the same step."""

    def run(k):
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1 / k)
        gate = DescentGate(progress=progress)
        reg = CoherentStrongReg(
            model.named_parameters(), strength=0.3 * k, optimizer=opt, warmup=0, criterion=gate
        )
        for x, y in _batches(6):
            opt.zero_grad()
            (k * nn.functional.cross_entropy(model(x), y)).backward()
            reg.step()
            opt.step()
            reg.after_step()
        return reg.history

    a, b = run(1.0), run(64.0)
    assert _measured(b, "undo") == pytest.approx(_measured(a, "undo"), rel=1e-4)
    assert [h["active"] for h in a] == [h["active"] for h in b]


def _progress_run(progress, **kw):
    """Plain SGD on a tensor far from zero with ``g = c * ones``: the optimizer's progress is
    ``lr c^2 n``, so ``c`` sets it; ``smoothing=0`` makes the average the last value."""
    p = nn.Parameter(torch.full((2, 2), 10.0, dtype=torch.float64))
    opt = torch.optim.SGD([p], lr=0.1)
    gate = DescentGate(progress="same-batch", smoothing=0.0)
    reg = CoherentStrongReg([p], strength=1e-3, optimizer=opt, criterion=gate, **kw)
    for value in progress:
        p.grad = math.sqrt(value / (0.1 * 4)) * torch.ones(2, 2, dtype=torch.float64)
        reg.step()
        opt.step()
        reg.after_step()
    return reg


@pytest.mark.parametrize(
    ("progress", "trigger"),
    [
        ([1, 1, 1, 1, 1, 3, 6, 9.9, 12, 12], 8),  # grown 10-fold over the level at step 4
        ([1, 1, 1, 1, 1, 3, 2, 1.6, 1.4, 1], 8),  # fallen to half of the peak (3)
        ([1, 1, 1, 1, 1, 1, 1.2, 1.1, 1, 1], None),  # neither: keeps waiting
    ],
    ids=["grown", "fallen-from-peak", "waiting"],
)
def test_auto_warmup_starts_at_takeoff_and_ramps_over_four_times_the_wait(progress, trigger):
    reg = _progress_run(progress)
    state = reg.state_dict()
    if trigger is None:
        assert state["ramp_start"] is None and not reg.is_active
        assert all(h["strength"] == 0 for h in reg.history)
        return
    assert state["ramp_start"] == trigger + 1  # from the step after the trigger
    assert state["ramp_length"] == 4 * (trigger + 1)
    used = [h["strength"] for h in reg.history]
    assert used[: trigger + 1] == [0] * (trigger + 1)  # nothing applied while waiting
    assert used[trigger + 1] == pytest.approx(1e-3 / (4 * (trigger + 1)))  # linear ramp


def test_fixed_warmup_and_delay():
    p = nn.Parameter(torch.full((2, 2), 10.0))
    opt = torch.optim.SGD([p], lr=0.1)
    reg = CoherentStrongReg([p], strength=0.2, optimizer=opt, warmup=4, delay=2, criterion="always")
    used = []
    for _ in range(8):
        p.grad = torch.zeros(2, 2)
        reg.step()
        opt.step()
        reg.after_step()
        used.append(reg.history[-1]["strength"])
    assert used == pytest.approx([0, 0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2])
    assert torch.allclose(p.detach(), torch.full((2, 2), 10.0 - 0.1 * sum(used)))


# ----------------------------------------------------------------------------- ratio rule
def _np_measures(grads, weights, kind, strength):
    g = np.concatenate([x.detach().numpy().ravel() for x in grads]).astype(np.float64)
    w = np.concatenate([x.detach().numpy().ravel() for x in weights]).astype(np.float64)
    r = strength * (np.sign(w) if kind == "l1" else w)
    cos = float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r)))
    r_norm = strength * math.sqrt(w.size) if kind == "l1" else np.linalg.norm(r)
    return cos, float(r_norm / np.linalg.norm(g))


@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_ratio_rule_measures_match_numpy(kind):
    weights = [torch.randn(5, 3), torch.randn(4, 2, 3, 3)]
    weights[0][0, 0] = 0.0  # sign(0) = 0 contributes nothing to the L1 gradient
    grads = [torch.randn(5, 3), torch.randn(4, 2, 3, 3)]
    reg = CoherentStrongReg(
        _params_with_grads(weights, grads), kind=kind, strength=0.3, **RATIO_RULE
    )
    reg.step()
    reg.after_step()
    cos, ratio = _np_measures(grads, weights, kind, 0.3)
    assert reg.history[0]["cosine"] == pytest.approx(cos, rel=1e-5)
    assert reg.history[0]["ratio"] == pytest.approx(ratio, rel=1e-5)


def test_coherence_statistics_hand_values():
    w = [torch.tensor([2.0, -1.0, 0.0])]
    g = [torch.tensor([1.0, 3.0, 4.0])]
    # L1: r = [1, -1, 0] -> <g, r> = -2, |g|^2 = 26, |r|^2 = 2
    assert coherence_statistics(g, w, "l1").tolist() == pytest.approx([-2.0, 26.0, 2.0])
    # L2: r = w -> <g, r> = -1, |r|^2 = 5
    assert coherence_statistics(g, w, "l2").tolist() == pytest.approx([-1.0, 26.0, 5.0])


def _gate_with_ratios(ratios, **kw):
    """Drive the ratio rule with chosen |r|/|g| by scaling a fixed L2 gradient."""
    p = nn.Parameter(torch.ones(2, 2))
    reg = CoherentStrongReg([p], kind="l2", strength=1.0, **{**RATIO_RULE, **kw})
    states = []
    for ratio in ratios:
        p.grad = torch.ones(2, 2) / ratio  # |r| = 2, |g| = 2 / ratio
        reg.step()
        reg.after_step()
        states.append(reg.is_active)
    return states


def test_ratio_rule_switches_off_after_window_and_back_on():
    states = _gate_with_ratios([1, 9, 1, 9, 9, 9, 1, 1, 9, 1], max_ratio=4.0, window=2)
    assert states == [True, True, True, True, False, False, False, True, True, True]


def test_ratio_rule_without_reactivation_stays_off():
    states = _gate_with_ratios([9, 9, 1, 1, 1], max_ratio=4.0, window=2, reactivate=False)
    assert states == [True, False, False, False, False]


def test_ratio_rule_min_cosine_and_delay():
    p = nn.Parameter(torch.ones(3, 1))
    kw = {**RATIO_RULE, "max_ratio": None, "min_cosine": 0.0, "window": 1, "delay": 2}
    reg = CoherentStrongReg([p], kind="l2", strength=1.0, **kw)
    seen = []
    for sign in (-1, -1, 1, -1, 1):
        p.grad = sign * torch.ones(3, 1)
        reg.step()
        reg.after_step()
        seen.append(reg.is_active)
    assert seen == [False, True, True, False, True]  # starts after 2 steps; cos rule after


def test_l2_added_to_the_gradient_only_while_active():
    w = torch.full((2, 2), 0.5)
    p = nn.Parameter(w.clone())
    reg = CoherentStrongReg(
        [p],
        kind="l2",
        strength=0.1,
        max_ratio=4.0,
        window=1,
        **{k: v for k, v in RATIO_RULE.items() if k != "l1_mode"},
    )
    p.grad = torch.ones(2, 2)  # ratio 0.05: coherent, on
    reg.step()
    assert torch.allclose(p.grad, torch.ones(2, 2) + 0.1 * w)
    reg.after_step()
    p.grad = torch.full((2, 2), 1e-4)  # ratio 500: incoherent, off at once (window=1)
    reg.step()
    assert not reg.is_active
    assert torch.equal(p.grad, torch.full((2, 2), 1e-4))
    reg.after_step()


# ----------------------------------------------------------------------------- update rules
def test_l2_always_on_equals_sgd_weight_decay():
    ours, ref = _mlp(), _mlp()
    weights = [p for n, p in ref.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in ref.named_parameters() if n.endswith("bias")]
    opt_ref = torch.optim.SGD(
        [{"params": weights, "weight_decay": 0.05}, {"params": biases}], lr=0.1, momentum=0.9
    )
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    reg = CoherentStrongReg(
        ours.named_parameters(),
        kind="l2",
        strength=0.05,
        criterion="always",
        warmup=0,
        optimizer=opt,
    )
    reg.attach()
    for x, y in _batches():
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            o.step()
    assert all(h["active"] for h in reg.history)
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_prox_l1_equals_numpy_soft_threshold_per_group_lr():
    model = _mlp()
    opt = torch.optim.SGD(
        [
            {"params": model[0].parameters(), "lr": 0.2},
            {"params": model[2].parameters(), "lr": 0.05},
        ]
    )
    reg = CoherentStrongReg(
        model.named_parameters(), strength=0.05, optimizer=opt, criterion="always", warmup=0
    )
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {}
    for (n, p), lr in zip(model.named_parameters(), (0.2, 0.2, 0.05, 0.05), strict=True):
        after_sgd = (p.detach() - lr * p.grad).numpy().astype(np.float64)
        expected[n] = _soft(after_sgd, lr * 0.05) if n.endswith("weight") else after_sgd
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.step()
    for n, p in model.named_parameters():  # prox mode leaves the gradient alone
        assert torch.equal(p.grad, grads_before[n])
    opt.step()
    reg.after_step()
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), expected[n], rtol=1e-5, atol=1e-7)
    assert int((model[0].weight == 0).sum()) == int((expected["0.weight"] == 0).sum()) > 0


def test_subgradient_l1_adds_sign_and_zeroes_crossings():
    p = nn.Parameter(torch.tensor([[0.05, -0.3], [0.0, 1.0], [0.0, 0.5]]))
    opt = torch.optim.SGD([p], lr=1.0)
    reg = CoherentStrongReg([p], strength=0.1, l1_mode="subgradient", criterion="always", warmup=0)
    p.grad = torch.tensor([[0.2, 0.1], [-0.5, 0.0], [0.08, 0.0]])
    reg.step()
    # w != 0: g + 0.1 sign(w); w == 0: sign(g) max(|g| - 0.1, 0) (-0.4, and 0 for |g| <= 0.1)
    torch.testing.assert_close(p.grad, torch.tensor([[0.3, 0.0], [-0.4, 0.1], [0.0, 0.1]]))
    opt.step()  # -> [[-0.25, -0.3], [0.4, 0.9], [0.0, 0.4]]: the first weight crossed zero
    reg.after_step()
    assert torch.equal(p.detach(), torch.tensor([[0.0, -0.3], [0.4, 0.9], [0.0, 0.4]]))


def test_subgradient_l1_zeros_stay_zero_under_momentum():
    p = nn.Parameter(torch.tensor([[0.0, 0.0, 0.3]]))
    opt = torch.optim.SGD([p], lr=0.5, momentum=0.9)
    reg = CoherentStrongReg([p], strength=0.1, l1_mode="subgradient", criterion="always", warmup=0)
    p.grad = torch.tensor([[0.5, 0.0, 0.0]])  # the first zero weight is pushed hard
    reg.step()
    opt.step()
    reg.after_step()
    assert p[0, 0] != 0  # |g| > strength: it left zero
    for _ in range(5):  # small loss gradients: a zero stays exactly zero despite momentum
        p.grad = torch.tensor([[0.0, 0.05, 0.0]])
        reg.step()
        opt.step()
        reg.after_step()
    assert p[0, 1] == 0
    assert p[0, 2] >= 0  # crossed zero at some step -> exact zero, never < 0


def test_default_selection_regularises_conv_and_linear_weights_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    reg = CoherentStrongReg(model.named_parameters(), strength=0.1)
    assert reg.names == ["0.weight", "3.weight"]
    everything = CoherentStrongReg(model.named_parameters(), strength=0.1, weights_only=False)
    assert len(everything.params) == len(list(model.parameters()))


def test_tensors_frozen_after_construction_are_skipped_not_an_error():
    # RandomLayerTraining and RIFLE-style fine-tuning freeze layers between steps
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    reg = CoherentStrongReg(
        model.named_parameters(), kind="l2", strength=0.5, criterion="always", warmup=0, lr=0.1
    )
    model[0].weight.requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    model(torch.randn(5, 3)).sum().backward()
    loss_grad = model[1].weight.grad.clone()
    reg.step()
    assert model[0].weight.grad is None
    torch.testing.assert_close(model[1].weight.grad, loss_grad + 0.5 * model[1].weight)
    reg.after_step()
    assert torch.equal(model[0].weight, frozen_before)


# ----------------------------------------------------------------------------- small trainings
def _digits():
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    return torch.tensor(x_np / 16.0, dtype=torch.float32), torch.tensor(y_np)


def _digits_run(epochs=12, **reg_kwargs):
    x, y = _digits()
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg = CoherentStrongReg(model.named_parameters(), optimizer=opt, **reg_kwargs)
    handle = reg.attach()
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    handle.remove()
    with torch.no_grad():
        logits = model(x)
    acc = float((logits.argmax(1) == y).float().mean())
    return acc, compression_report(model), reg


@pytest.mark.slow
def test_gate_stays_on_while_learning_converges():
    """Near convergence the optimizer's progress shrinks, and so does the regulariser's
    cost: the gate (same-batch progress) must not switch off merely because the gradient
    gets small."""
    acc, report, reg = _digits_run(strength=0.01, epochs=15, criterion=SAME)
    history = list(reg.history)
    last = history[-3 * 29 :]  # the last three epochs (29 steps each)
    assert all(h["active"] for h in last)
    early = [h["progress"] for h in history[30:60]]
    assert np.mean([h["progress"] for h in last]) < 0.5 * np.mean(early)  # converging
    assert acc > 0.9  # measured 0.947 (0.998 with no regulariser)
    assert report.compression_ratio > 5  # measured 8.2x


@pytest.mark.slow
def test_gate_switches_off_when_strong_regularisation_collapses_training():
    always_acc, _, _ = _digits_run(strength=0.1, criterion="always", warmup=0)
    assert always_acc < 0.2  # collapsed: chance is 0.1
    acc, report, reg = _digits_run(strength=0.1, criterion=SAME)
    active = [h["active"] for h in reg.history]
    switches = [i for i in range(1, len(active)) if active[i] != active[i - 1]]
    assert switches  # the gate switched the regulariser off (and on again)
    assert acc > 0.8  # measured 0.884
    assert report.compression_ratio > 20  # measured 72x


def test_a_step_that_would_zero_a_whole_tensor_is_not_taken():
    """Far too strong a regulariser from step 0 (no warm-up) zeroes every weight in one or
    two steps, faster than the averages can react; the gate refuses that step instead."""

    def run(criterion):
        model = _mlp(hidden=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        reg = CoherentStrongReg(
            model.named_parameters(), strength=1.0, optimizer=opt, warmup=0, criterion=criterion
        )
        with reg.attach():
            for x, y in _batches(6):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
        return model, reg

    always, _ = run("always")
    assert all(int(p.count_nonzero()) == 0 for p in (always[0].weight, always[2].weight))
    model, reg = run("descent")
    wiped = [h for h in reg.history if "wiped" in h]
    assert wiped and wiped[0]["step"] == 0 and not reg.is_active
    assert all(int(p.count_nonzero()) > 0 for p in (model[0].weight, model[2].weight))


# ----------------------------------------------------------------------------- optimizer hooks
def _train_manual(model, opt, reg, batches, clip=None):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
        reg.step()
        opt.step()
        reg.after_step()


def _pair(make_opt, strength=0.1, **kw):
    models = [_mlp(hidden=32), _mlp(hidden=32)]
    opts = [make_opt(m.parameters()) for m in models]
    kw = {"criterion": DescentGate(), **kw}  # the gate: its decisions must agree too
    regs = [
        CoherentStrongReg(m.named_parameters(), strength=strength, optimizer=o, warmup=0, **kw)
        for m, o in zip(models, opts, strict=True)
    ]
    return models, opts, regs


def _assert_same_run(a_model, a_reg, b_model, b_reg):
    assert [h["active"] for h in a_reg.history] == [h["active"] for h in b_reg.history]
    assert len({h["active"] for h in a_reg.history}) == 2  # the gate acted
    for p, q in zip(a_model.parameters(), b_model.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    ("make_opt", "strength"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.5), 0.1),
        (lambda ps: torch.optim.SGD(ps, lr=0.5, foreach=True), 0.1),
        (lambda ps: torch.optim.Adam(ps, lr=0.05, fused=True), 1.0),
        (lambda ps: torch.optim.AdamW(ps, lr=0.05, foreach=False), 1.0),
    ],
    ids=["sgd", "sgd-foreach", "adam-fused", "adamw-for-loop"],
)
def test_attach_equals_manual_calls(make_opt, strength):
    (m1, m2), (o1, o2), (r1, r2) = _pair(make_opt, strength)
    batches = _batches(12)
    _train_manual(m1, o1, r1, batches)
    with r2.attach():
        for x, y in batches:
            o2.zero_grad()
            nn.functional.cross_entropy(m2(x), y).backward()
            o2.step()
    _assert_same_run(m1, r1, m2, r2)


def test_attach_runs_after_the_closure_computed_the_gradients():
    (m1, m2), (o1, o2), (r1, r2) = _pair(lambda ps: torch.optim.SGD(ps, lr=0.5))
    batches = _batches(12)
    _train_manual(m1, o1, r1, batches)
    r2.attach()
    for x, y in batches:

        def closure(x=x, y=y):
            o2.zero_grad()
            loss = nn.functional.cross_entropy(m2(x), y)
            loss.backward()
            return loss

        o2.step(closure)
    _assert_same_run(m1, r1, m2, r2)


def test_attach_sees_clipped_gradients():
    (m1, m2), (o1, o2), (r1, r2) = _pair(lambda ps: torch.optim.SGD(ps, lr=0.5))
    batches = _batches(12)
    _train_manual(m1, o1, r1, batches, clip=0.05)
    r2.attach()
    for x, y in batches:
        o2.zero_grad()
        nn.functional.cross_entropy(m2(x), y).backward()
        nn.utils.clip_grad_norm_(m2.parameters(), 0.05)
        o2.step()
    _assert_same_run(m1, r1, m2, r2)


def test_attach_handle_detaches_and_double_attach_is_an_error():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = CoherentStrongReg(model.named_parameters(), strength=0.1, optimizer=opt)
    handle = reg.attach()
    with pytest.raises(RuntimeError, match="already attached"):
        reg.attach()
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert reg.num_steps == 1
    handle.remove()
    opt.step()
    assert reg.num_steps == 1
    reg.attach()  # attaching again after remove() is fine
    other = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        CoherentStrongReg(model.named_parameters(), strength=0.1, optimizer=opt).attach(other)


def _scaler_run(scaler, inject_inf_at=None, steps=10):
    model = _mlp(hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    reg = CoherentStrongReg(
        model.named_parameters(), strength=0.3, optimizer=opt, warmup=0, scaler=scaler,
        criterion=SAME,
    )  # fmt: skip
    reg.attach()
    weights = []
    for i, (x, y) in enumerate(_batches(steps)):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            if i == inject_inf_at:
                model[0].weight.grad[0, 0] = float("inf")
            scaler.step(opt)
            scaler.update()
        weights.append([p.detach().clone() for p in model.parameters()])
    return reg, weights


def test_grad_scaler_gate_decisions_equal_the_unscaled_run_and_skipped_steps_change_nothing():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    ref, _ = _scaler_run(None)
    got, _ = _scaler_run(scaler)
    assert [h["active"] for h in got.history] == [h["active"] for h in ref.history]
    assert [h["undo"] for h in got.history] == pytest.approx(
        [h["undo"] for h in ref.history], rel=1e-4
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a skipped scaler step is silent
        skipped, weights = _scaler_run(
            torch.amp.GradScaler("cpu", init_scale=2.0**12), inject_inf_at=4
        )
    assert skipped.num_steps == 9  # the hooks did not run on the skipped step ...
    for a, b in zip(weights[3], weights[4], strict=True):
        assert torch.equal(a, b)  # ... and nothing changed the weights
    assert all(math.isfinite(h["undo"]) for h in skipped.history)


def test_bf16_autocast_gives_the_fp32_decisions():
    def run(autocast):
        model = _mlp(hidden=32)
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        reg = CoherentStrongReg(
            model.named_parameters(), strength=0.3, optimizer=opt, warmup=0, criterion=SAME
        )
        reg.attach()
        for x, y in _batches(12):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
        return reg

    fp32, bf16 = run(False), run(True)
    assert [h["active"] for h in bf16.history] == [h["active"] for h in fp32.history]
    assert all(math.isfinite(h["undo"]) for h in bf16.history)


# ----------------------------------------------------------------------------- call order, NaN
def test_step_twice_without_after_step_raises_and_changes_nothing():
    model = _mlp()
    reg = CoherentStrongReg(
        model.named_parameters(), kind="l2", strength=0.1, lr=0.1, criterion="always", warmup=0
    )
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    reg.step()
    grads = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="after_step"):
        reg.step()  # the L2 term would be added twice
    for p, g in zip(model.parameters(), grads, strict=True):
        assert torch.equal(p.grad, g)
    reg.after_step()
    with pytest.raises(RuntimeError, match="without step"):
        reg.after_step()
    assert reg.num_steps == 1


def test_step_without_grad_raises_and_changes_nothing():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    reg = CoherentStrongReg([("a", a), ("b", b)], strength=0.1, lr=0.1)
    a.grad = torch.ones(2, 2)
    with pytest.raises(RuntimeError, match=r"\['b'\]"):
        reg.step()
    assert torch.equal(a.grad, torch.ones(2, 2))
    assert reg.num_steps == 0
    assert list(reg.history) == []


def test_prox_without_learning_rate_is_a_runtime_error_before_anything_changes():
    p = nn.Parameter(torch.ones(2, 2))
    reg = CoherentStrongReg([p], strength=0.1)
    p.grad = torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="learning rate"):
        reg.step()
    assert reg.num_steps == 0
    with pytest.raises(RuntimeError, match="without step"):
        reg.after_step()


def test_non_finite_gradient_skips_the_step_with_a_warning_and_keeps_the_state():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = CoherentStrongReg(
        model.named_parameters(), strength=0.05, optimizer=opt, warmup=0, criterion=SAME
    )
    batches = _batches(3)
    _manual_step(model, opt, reg, *batches[0])
    state = reg.state_dict()
    opt.zero_grad()
    nn.functional.cross_entropy(model(batches[1][0]), batches[1][1]).backward()
    model[2].weight.grad[0, 0] = float("nan")
    reg.step()
    with torch.no_grad():
        weights = [p.clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="not finite"):
        reg.after_step()
    for p, w in zip(model.parameters(), weights, strict=True):
        assert torch.equal(p, w)  # no proximal step on a skipped step
    new = reg.state_dict()
    assert new["num_steps"] == state["num_steps"] + 1 and new["num_skipped"] == 1
    assert {k: v for k, v in new.items() if k not in ("num_steps", "num_skipped")} == {
        k: v for k, v in state.items() if k not in ("num_steps", "num_skipped")
    }


def test_history_is_bounded_and_switches_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="torch_recal"):
        _, reg = _drive([0.1, 0.9, 0.1, 0.1], history_size=2)
    assert len(reg.history) == 2
    assert [h["step"] for h in reg.history] == [2, 3]
    messages = [r.getMessage() for r in caplog.records if r.name == "torch_recal"]
    assert any("off after step 1" in m for m in messages)
    assert any("on after step 2" in m for m in messages)


# ----------------------------------------------------------------------------- functional
def test_soft_threshold_matches_numpy_and_checks_dtypes_before_changing_anything():
    ts = [torch.randn(7, 3), torch.randn(5)]
    ref = [_soft(t.numpy(), 0.4) for t in ts]
    soft_threshold_(ts, 0.4)
    for t, r in zip(ts, ref, strict=True):
        np.testing.assert_allclose(t.numpy(), r, rtol=1e-6, atol=1e-7)
    a, b = torch.tensor([-2.0, 3.0]), torch.tensor([1, -2])
    with pytest.raises(TypeError, match=r"tensors\[1\]"):
        soft_threshold_([a, b], 1.0)
    assert torch.equal(a, torch.tensor([-2.0, 3.0])) and torch.equal(b, torch.tensor([1, -2]))


# ----------------------------------------------------------------------------- distributed
def _ddp_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2)
    reg = CoherentStrongReg(model.named_parameters(), strength=0.1, optimizer=opt, warmup=0,
                            criterion=DescentGate())  # fmt: skip
    reg.attach()
    for x, y in _batches(16, seed=100 + rank):  # each rank sees different data
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
    params = [p.detach().clone() for p in model.parameters()]
    return {"history": list(reg.history), "params": params}


@pytest.mark.distributed
def test_ddp_decisions_and_weights_identical_on_every_rank():
    r0, r1 = run_distributed(_ddp_worker)
    assert r0["history"] == r1["history"]
    assert len({h["active"] for h in r0["history"]}) == 2  # the gate switched at least once
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


_FSDP_CASES = [
    {"l1_mode": "subgradient", **RATIO_RULE, "max_ratio": 1.0},  # the ratio rule switches
    {"l1_mode": "prox", "criterion": SAME, "warmup": 0},  # the descent rule switches
    {"l1_mode": "prox", "criterion": DescentGate(), "warmup": 0},  # next-batch progress
]


def i_case(case: dict) -> int:
    return next(i for i, c in enumerate(_FSDP_CASES) if c is case)


def _coherent_run(case: dict, rank: int | None, world_size: int = 2, hsdp: bool = False) -> dict:
    """16 steps on a global batch of 32; rank None: one process, else FSDP2 with an equal
    part per rank (``hsdp``: a 2 x 2 mesh, replicated across its first dimension)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if hsdp:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world_size,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    strength = 0.05 if case["criterion"] == "ratio" else 0.1 if i_case(case) < 2 else 0.02
    reg = CoherentStrongReg(model.named_parameters(), strength=strength, optimizer=opt, **case)
    reg.attach()
    part = 32 // world_size
    rows = slice(None) if rank is None else slice(part * rank, part * rank + part)
    for x, y in _batches(16, seed=101):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    report = compression_report(model)  # counts every rank's slice under FSDP2
    params = [p.detach() for p in model.parameters()]
    if rank is not None:
        params = [p.full_tensor() for p in params]
    return {"history": list(reg.history), "params": params, "zeros": report.zeros}


def _fsdp_worker(rank: int, world_size: int, hsdp: bool = False) -> list[dict]:
    return [_coherent_run(case, rank, world_size, hsdp) for case in _FSDP_CASES]


@pytest.mark.distributed
@pytest.mark.parametrize("hsdp", [False, True], ids=["fsdp2", "hsdp-2x2"])
@needs_fsdp2
def test_fsdp2_sharded_parameters_give_the_single_process_run(hsdp):
    # HSDP: sums over the sharded mesh dimension only (the replicated one holds copies)
    ranks = run_distributed(_fsdp_worker, hsdp, world_size=4 if hsdp else 2)
    for i, case in enumerate(_FSDP_CASES):
        ref = _coherent_run(case, None)
        if i < 2:
            assert len({h["active"] for h in ref["history"]}) == 2  # the gate switched
        assert ref["zeros"] > 0 or case["criterion"] == "ratio"  # prox made exact zeros
        keys = ("cosine", "ratio", "grad_norm") if case["criterion"] == "ratio" else ("undo",)
        for out in ranks:
            got = out[i]
            assert [h["active"] for h in got["history"]] == [h["active"] for h in ref["history"]]
            for key in (*keys, "progress", "cost"):  # whole-tensor statistics, not a shard's
                a = [h[key] for h in got["history"]]
                b = [h[key] for h in ref["history"]]
                assert [v is None for v in a] == [v is None for v in b], key
                a, b = [v for v in a if v is not None], [v for v in b if v is not None]
                assert a == pytest.approx(b, rel=1e-3, abs=1e-7), key
            for a, b in zip(got["params"], ref["params"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
                assert torch.equal(a == 0, b == 0)  # the same exact zeros
            zeros = sum(int((p == 0).sum()) for p in ref["params"] if p.ndim == 2)
            assert got["zeros"] == ref["zeros"] == zeros


# ----------------------------------------------------------------------------- example
@pytest.mark.slow
def test_example_smoke_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_RECAL_COMPILE": "0"}
    script = ROOT / "examples" / "coherent_reg.py"
    out = subprocess.run(
        [sys.executable, str(script), "--smoke", "--no-progress", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compression" in out.stdout
    assert any(tmp_path.glob("*.png"))


# --------------------------------------------------------------------------- freeze_below
def _decayed_run(freeze_below, lrs, strength=0.05, seed=0):
    """Prox L1 always on (no warm-up), SGD with momentum, the given lr per step."""
    model = _mlp(seed=seed, hidden=32)
    opt = torch.optim.SGD(model.parameters(), lr=lrs[0], momentum=0.9)
    reg = CoherentStrongReg(model.named_parameters(), strength=strength, optimizer=opt,
                            criterion="always", warmup=0, freeze_below=freeze_below)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    batches = [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g))
               for _ in lrs]  # fmt: skip
    return model, opt, reg, batches


def _train(model, opt, reg, batches, lrs, start=0):
    with reg.attach():
        for i in range(start, len(lrs)):
            for group in opt.param_groups:
                group["lr"] = lrs[i]
            x, y = batches[i]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


def test_freeze_below_keeps_the_zero_pattern_and_stops_the_shrinkage():
    """After the lr falls below a tenth of its peak, every step equals plain SGD (momentum
    and all) followed by re-zeroing the weights that were zero when the pattern froze:
    checked against a hand-run copy of the model and optimizer."""
    lrs = [0.5] * 6 + [0.04] * 6  # 0.04 < 0.1 * 0.5: frozen from step 6 on
    model, opt, reg, batches = _decayed_run(0.1, lrs)
    _train(model, opt, reg, batches, lrs[:6])
    assert not reg.frozen and reg.is_active
    # the reference: a copy of model and optimizer, no regulariser, masked by hand
    ref_model = _mlp(seed=0, hidden=32)
    ref_model.load_state_dict(model.state_dict())
    ref_opt = torch.optim.SGD(ref_model.parameters(), lr=0.04, momentum=0.9)
    ref_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # its own momentum buffers
    weights = [ref_model[0].weight, ref_model[2].weight]
    masks = [w.detach() == 0 for w in weights]
    assert sum(int(m.sum()) for m in masks) > 20  # the L1 phase made zeros
    unmasked = _mlp(seed=0, hidden=32)  # plain SGD without the mask, to show it matters
    unmasked.load_state_dict(model.state_dict())
    unmasked_opt = torch.optim.SGD(unmasked.parameters(), lr=0.04, momentum=0.9)
    unmasked_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    for i in range(6, 12):
        x, y = batches[i]
        for m, o in ((ref_model, ref_opt), (unmasked, unmasked_opt)):
            for group in o.param_groups:
                group["lr"] = lrs[i]
            o.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            o.step()
        with torch.no_grad():
            for w, mask in zip(weights, masks, strict=True):
                w[mask] = 0.0
    _train(model, opt, reg, batches, lrs, start=6)
    assert reg.frozen and reg.state_dict()["frozen_at"] == 6 and not reg.is_active
    assert reg.strength_now == 0.0
    for a, b in zip(model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    regrown = sum(int((w != 0)[m].sum()) for w, m in zip(
        [unmasked[0].weight, unmasked[2].weight], masks, strict=True))  # fmt: skip
    assert regrown > 0  # momentum alone would have moved some pruned weights again
    assert [h.get("frozen", False) for h in reg.history] == [False] * 6 + [True] * 6


@pytest.mark.parametrize(
    ("freeze_below", "lrs", "frozen_at"),
    [
        (0.1, [0.01, 0.1, 0.1, 0.011, 0.0099, 0.1], 4),  # the peak includes a warm-up's rise
        (0.1, [0.1] * 6, None),  # constant lr: never
        (None, [0.1, 0.1, 0.001, 0.001], None),  # switched off
        (0.5, [0.1, 0.06, 0.049, 0.1], 2),
    ],
)
def test_freeze_below_freezes_at_the_first_step_below_the_fraction_of_the_peak(
    freeze_below, lrs, frozen_at
):
    model, opt, reg, batches = _decayed_run(freeze_below, lrs)
    _train(model, opt, reg, batches, lrs)
    assert reg.state_dict()["frozen_at"] == frozen_at
    assert reg.frozen == (frozen_at is not None)
    assert reg.state_dict()["peak_lr"] == pytest.approx(max(lrs[: frozen_at or len(lrs)]))


# ----------------------------------------------------------------------------- one shape
def test_every_earlier_call_form_builds_the_same_criterion():
    p = nn.Parameter(torch.ones(3, 3))
    legacy = CoherentStrongReg([p], strength=0.1, lr=0.1, max_undo=0.3, smoothing=0.5)
    assert legacy.criterion == DescentGate(max_undo=0.3, smoothing=0.5)
    ratio = CoherentStrongReg([p], strength=0.1, lr=0.1, criterion="ratio", window=3,
                              reactivate=False)  # fmt: skip
    assert ratio.criterion == RatioRule(window=3, reactivate=False)
    assert CoherentStrongReg([p], strength=0.1, criterion="always").criterion == Always()
    assert CoherentStrongReg([p], strength=0.1, lr=0.1, criterion="descent").criterion == (
        DescentGate()
    )
    assert CoherentStrongReg([p], strength=0.1, lr=0.1, criterion=None).criterion == Always()
    gate = CoherentStrongReg([p], strength=0.1, lr=0.1, resume_undo=0.1)  # the gate's options
    assert gate.criterion == DescentGate(resume_undo=0.1)  # alone still select the gate
    with pytest.raises(TypeError, match="`window` is an option of RatioRule"):
        CoherentStrongReg([p], strength=0.1, lr=0.1, window=3)
    with pytest.raises(TypeError, match="belongs in the criterion object"):
        CoherentStrongReg([p], strength=0.1, lr=0.1, criterion=DescentGate(), max_undo=0.2)


def test_the_strength_driven_default_is_always_warmup_prox_freeze_by_hand():
    """``strength=`` without ``criterion=``: ``Always()``. Hand computation in numpy of
    0.5 ||w - target||^2 under SGD: no regularisation during ``delay``, the proximal step
    ``soft(w - lr g, lr * strength * ramp)`` at every step of the linear warm-up and after it,
    then, once the learning rate is below ``freeze_below`` of its peak, plain SGD with the
    zeros kept."""
    rng = np.random.default_rng(3)
    w = rng.normal(size=(4, 5))
    target = rng.normal(size=(4, 5)) * 0.5
    p = nn.Parameter(torch.tensor(w))
    opt = torch.optim.SGD([p], lr=0.5)
    s, delay, warmup = 0.4, 1, 2
    reg = CoherentStrongReg([p], strength=s, optimizer=opt, delay=delay, warmup=warmup)
    assert reg.criterion == Always()
    lrs = [0.5] * 6 + [0.02] * 3  # 0.02 < 0.1 * 0.5: frozen from step 6 on
    for t, lr in enumerate(lrs):
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        (0.5 * (p - torch.tensor(target)).square().sum()).backward()
        reg.step()
        opt.step()
        reg.after_step()
        frozen = lr < 0.1 * 0.5
        zeros = w == 0  # the zeros before the step
        w = w - lr * (w - target)  # numpy: the SGD step
        if frozen:  # no more regularisation; the zeros stay zero
            w = np.where(zeros, 0.0, w)
        elif t >= delay:  # numpy: the proximal step, ramped over the warm-up
            w = _soft(w, lr * s * min(1.0, (t - delay + 1) / warmup))
        assert reg.history[-1]["active"] is (t >= delay and not frozen), t
        np.testing.assert_allclose(p.detach().numpy(), w, rtol=0, atol=1e-12, err_msg=str(t))
    assert reg.frozen and reg.state_dict()["frozen_at"] == 6
    assert 0 < int((w == 0).sum()) < w.size  # the proximal steps made exact zeros, not all


def _gate(model, opt):
    """The descent-gated regulariser of the tests that save and resume gate states."""
    return CoherentStrongReg(
        model.named_parameters(), strength=0.05, optimizer=opt, warmup=0, criterion=DescentGate()
    )


def test_a_gate_state_resumes_only_into_the_gate():
    """A state saved with the descent gate (the default before ``Always()``) loads into
    ``criterion=DescentGate()``; into the default (``Always()``) it is a ``ValueError`` naming
    the criterion, also for a state saved before the criterion's name was recorded."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gate = _gate(model, opt)
    for x, y in _batches(3):
        _manual_step(model, opt, gate, x, y)
    saved = gate.state_dict()
    assert saved["criterion"] == "descent" and saved["last_step"] is not None
    older = {k: v for k, v in saved.items() if k != "criterion"}  # before it was recorded
    for state in (saved, older):
        again = _gate(model, opt)
        again.load_state_dict(state)
        assert again.num_steps == 3
        default = CoherentStrongReg(model.named_parameters(), strength=0.05, optimizer=opt,
                                    warmup=0)  # fmt: skip
        with pytest.raises(ValueError, match=r"`criterion`.*'descent'.*criterion=DescentGate\(\)"):
            default.load_state_dict(state)
        assert default.num_steps == 0  # nothing changed
    plain = CoherentStrongReg(model.named_parameters(), strength=0.05, optimizer=opt, warmup=0)
    for x, y in _batches(2):
        _manual_step(model, opt, plain, x, y)
    state = plain.state_dict()
    assert state["criterion"] == "always"
    older = {k: v for k, v in state.items() if k != "criterion"}
    for loaded in (state, older):  # an Always state loads, with its name or without it
        fresh = CoherentStrongReg(model.named_parameters(), strength=0.05, optimizer=opt,
                                  warmup=0)  # fmt: skip
        fresh.load_state_dict(loaded)
        assert fresh.num_steps == 2
    ratio = CoherentStrongReg(model.named_parameters(), strength=0.05, optimizer=opt, warmup=0,
                              criterion="ratio")  # fmt: skip
    with pytest.raises(ValueError, match=r"'always'.*RatioRule"):
        ratio.load_state_dict(state)
    with pytest.raises(TypeError, match="`criterion`"):
        ratio.load_state_dict({**state, "criterion": 1})


def test_the_constructor_takes_fewer_arguments_than_before():
    import inspect

    named = [
        n
        for n, q in inspect.signature(CoherentStrongReg).parameters.items()
        if q.kind is not q.VAR_KEYWORD
    ]
    assert len(named) < 21  # 21 before the criteria became objects
    for option in ("max_undo", "resume_undo", "smoothing", "max_ratio", "window"):
        assert option not in named  # they live with their criterion


def test_a_state_saved_before_the_next_batch_progress_loads():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = _gate(model, opt)
    for x, y in _batches(3):
        _manual_step(model, opt, reg, x, y)
    old = {
        k: v
        for k, v in reg.state_dict().items()
        if k not in ("measured_step", "measured_cost", "measured_applied", "last_step", "criterion")
    }
    fresh = _gate(model, opt)
    fresh.load_state_dict(old)
    state = fresh.state_dict()
    assert state["num_steps"] == 3 and state["measured_step"] is None
    assert state["last_step"] is None
    x, y = _batches(4)[3]
    _manual_step(model, opt, fresh, x, y)  # the first step after it measures nothing yet
    assert fresh.history[-1]["progress"] is None and fresh.state_dict()["measured_step"] == 3


# ----------------------------------------------------------------------------- group="unit"
def _group_soft(w, t):
    rows = w.reshape(w.shape[0], -1)
    norms = np.linalg.norm(rows, axis=1)
    cut = t * math.sqrt(rows.shape[1])
    scale = np.where(norms > cut, 1 - cut / np.maximum(norms, 1e-300), 0.0)
    return (rows * scale[:, None]).reshape(w.shape)


def test_group_soft_threshold_matches_numpy_and_kills_whole_units():
    rng = np.random.default_rng(0)
    w = [
        rng.normal(size=(6, 5)),
        rng.normal(size=(4, 2, 3, 3)) * np.array([0.1, 0.3, 1.0, 2.0])[:, None, None, None],
    ]
    ts = [torch.tensor(x) for x in w]
    group_soft_threshold_(ts, 0.5)
    for t, x in zip(ts, w, strict=True):
        ref = _group_soft(x, 0.5)
        np.testing.assert_allclose(t.numpy(), ref, rtol=1e-12, atol=1e-15)
        units = t.reshape(t.shape[0], -1)
        dead = (units == 0).all(1)
        assert dead.any() and bool(((units != 0).all(1) | dead).all())  # whole units only


def test_group_unit_prox_step_and_its_cost_match_hand_computation():
    w = np.array([[0.5, -0.2, 0.1], [0.05, 0.02, -0.01], [1.0, 2.0, -2.0]])
    g = np.array([[0.4, -0.1, 0.2], [0.3, 0.5, -0.6], [-0.1, 0.2, 0.3]])
    lr, s = 0.1, 0.5
    (p,) = _params_with_grads([torch.tensor(w)], [torch.tensor(g)])
    opt = torch.optim.SGD([p], lr=lr)
    reg = CoherentStrongReg([p], strength=s, optimizer=opt, warmup=0, group="unit",
                            criterion=SAME)  # fmt: skip
    reg.step()
    opt.step()
    reg.after_step()
    after = w - lr * g
    ref = _group_soft(after, lr * s)
    np.testing.assert_allclose(p.detach().numpy(), ref, rtol=1e-12, atol=1e-15)
    assert (ref[1] == 0).all() and (ref[0] != 0).all()  # the small unit died as a whole
    assert reg.history[0]["cost"] == pytest.approx((g * (ref - after)).sum(), rel=1e-12)


def test_next_batch_progress_skips_a_step_whose_trained_tensors_changed():
    """A layer frozen between two steps (e.g. by RandomLayerTraining): the last step's
    change no longer matches this step's tensors, so that measurement is skipped."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = _gate(model, opt)
    batches = _batches(4)
    _manual_step(model, opt, reg, *batches[0])
    model[0].weight.requires_grad_(False)
    model[0].weight.grad = None
    _manual_step(model, opt, reg, *batches[1])
    assert reg.history[0]["progress"] is None  # not measured: the tensors differ
    _manual_step(model, opt, reg, *batches[2])
    assert reg.history[1]["progress"] is not None  # the same tensor set again: measured
    assert reg.state_dict()["last_step"][0] is None  # the frozen tensor has no change


# ----------------------------------------------------------------------------- the budget
def _budget_fit(
    target=0.9,
    *,
    epochs=6,
    constant=False,
    total_steps=None,
    group=None,
    model=None,
    **budget,
):
    """A small MLP on the toy problem, SGD with momentum, cosine (or constant) lr per step."""
    model = model if model is not None else _mlp(hidden=64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    data = _batches(16)
    total = epochs * len(data)
    crit = Budget(target, total_steps=total if total_steps is True else total_steps, **budget)
    params = model.named_parameters()
    if group == "unit":  # the output layer's units are the classes: leave it out
        params = [(n, p) for n, p in params if not n.startswith("2.")]
    reg = CoherentStrongReg(params, optimizer=opt, criterion=crit, group=group)
    handle = reg.attach()
    step = 0
    for _ in range(epochs):
        for x, y in data:
            for g in opt.param_groups:
                g["lr"] = 0.1 if constant else 0.05 * (1 + math.cos(math.pi * step / total))
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            step += 1
    return model, reg, handle


def _zero_share(model):
    ws = [p for n, p in model.named_parameters() if n.endswith("weight")]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


@pytest.mark.parametrize(
    "budget",
    [{}, {"method": "magnitude"}, {"allocation": "layer"}],
    ids=["shrink-global", "magnitude", "layer"],
)
@pytest.mark.parametrize("target", [0.5, 0.9])
def test_budget_reaches_its_target_under_a_decayed_lr_and_keeps_the_pattern(target, budget):
    model, reg, handle = _budget_fit(target, **budget)
    assert reg.frozen
    assert abs(_zero_share(model) - target) <= 0.01  # counted independently of the library
    if budget.get("allocation") == "layer":
        for n, p in model.named_parameters():
            if n.endswith("weight"):
                assert abs(float((p == 0).float().mean()) - target) <= 0.01, n
    frozen = [p.detach() == 0 for p in reg.params]
    x, y = _batches(1, seed=9)[0]
    opt = reg.optimizer
    for _ in range(3):  # the pattern stays after the freeze
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for p, z in zip(reg.params, frozen, strict=True):
        assert torch.equal(p.detach() == 0, z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle.remove()  # reached: no warning


def test_budget_with_total_steps_reaches_its_target_at_a_constant_lr():
    model, reg, handle = _budget_fit(0.9, constant=True, total_steps=True)
    assert reg.frozen and reg.state_dict()["frozen_at"] == math.ceil(0.8 * 6 * 16)
    assert abs(_zero_share(model) - 0.9) <= 0.01
    handle.remove()


def test_a_budget_that_is_not_reached_says_so_with_the_sparsity_reached():
    model, reg, handle = _budget_fit(0.9, constant=True)  # no decay, no total_steps
    assert not reg.frozen and _zero_share(model) < 0.01  # the ramp never started
    with pytest.warns(RuntimeWarning, match=r"not reached: sparsity 0\.0\d\d of the target 0\.9"):
        handle.remove()


def test_a_budget_at_a_constant_lr_warns_after_a_thousand_steps():
    p = nn.Parameter(torch.randn(8, 8))
    reg = CoherentStrongReg([p], target_sparsity=0.5, lr=0.1)
    with pytest.warns(RuntimeWarning, match="pass `total_steps=`"):
        for _ in range(1001):
            p.grad = torch.zeros(8, 8)
            reg.step()
            reg.after_step()


def test_budget_shrink_leaves_the_unmarked_weights_alone():
    """One step of the shrink design with plain SGD and zero gradients: the weights above the
    marking threshold (the s(p)-quantile) keep their values; the marked ones move towards zero
    by rate x threshold."""
    torch.manual_seed(0)
    w0 = torch.randn(50, 40, dtype=torch.float64)
    p = nn.Parameter(w0.clone())
    reg = CoherentStrongReg([p], lr=0.1, criterion=Budget(0.5, total_steps=10, rate=0.25, every=1))
    for _ in range(2):  # step 0: target 0 (nothing marked); step 1: p = 1/8 of the ramp
        p.grad = torch.zeros_like(p)
        reg.step()
        reg.after_step()
    target = 0.5 * (1 - (1 - 1 / 8) ** 3)
    limit = np.quantile(np.abs(w0.numpy()).ravel(), target, method="lower")
    expected = np.where(
        np.abs(w0.numpy()) <= limit,
        np.sign(w0.numpy()) * np.maximum(np.abs(w0.numpy()) - 0.25 * limit, 0),
        w0.numpy(),
    )
    np.testing.assert_allclose(p.detach().numpy(), expected, rtol=0, atol=1e-12)
    assert reg.history[-1]["target"] == pytest.approx(target)


def test_budget_with_group_unit_kills_whole_units_and_shrink_removes_them():
    from torch_recal import shrink

    model, _, handle = _budget_fit(0.5, group="unit", model=_mlp(hidden=64))
    handle.remove()
    w = model[0].weight.detach()
    rows_dead = (w == 0).all(1)
    assert bool(((w != 0).all(1) | rows_dead).all())  # whole units only
    assert float((w == 0).float().mean()) == 0.5  # 32 of the 64 hidden units
    small, _ = shrink(model)
    x = torch.randn(20, 6)
    torch.testing.assert_close(small(x), model(x), rtol=0, atol=1e-6)
    assert small[0].out_features == 64 - int(rows_dead.sum())


@pytest.mark.parametrize("target", [0.0, 1.0, float("nan"), -0.1])
def test_a_bad_budget_is_a_clear_error(target):
    p = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="`target_sparsity`"):
        CoherentStrongReg([p], target_sparsity=target, lr=0.1)


def test_a_budget_needs_an_end_signal_and_no_strength():
    p = nn.Parameter(torch.ones(2, 2))
    with pytest.raises(ValueError, match="total_steps"):
        CoherentStrongReg([p], target_sparsity=0.9, lr=0.1, freeze_below=None)
    with pytest.raises(TypeError, match="`strength` is not used with a budget"):
        CoherentStrongReg([p], target_sparsity=0.9, strength=0.1, lr=0.1)
    with pytest.raises(TypeError, match="target_sparsity"):
        CoherentStrongReg([p], target_sparsity=0.9, lr=0.1, criterion="always")
