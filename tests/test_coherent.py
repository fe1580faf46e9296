"""Tests for CoherentStrongReg, compression_report and their functional kernels."""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tests.distributed import needs_fsdp2, run_distributed
from torch_recal import CoherentStrongReg, compression_report
from torch_recal.functional import coherence_statistics, soft_threshold_

ROOT = Path(__file__).resolve().parents[1]


def _np_measures(grads, weights, kind, strength):
    g = np.concatenate([x.detach().numpy().ravel() for x in grads]).astype(np.float64)
    w = np.concatenate([x.detach().numpy().ravel() for x in weights]).astype(np.float64)
    r = strength * (np.sign(w) if kind == "l1" else w)
    cos = float(g @ r / (np.linalg.norm(g) * np.linalg.norm(r)))
    # L1: |r| counts every entry (the subgradient at w == 0 can reach `strength`)
    r_norm = strength * math.sqrt(w.size) if kind == "l1" else np.linalg.norm(r)
    return cos, float(r_norm / np.linalg.norm(g))


def _params_with_grads(weights, grads):
    params = [nn.Parameter(w.clone()) for w in weights]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return params


# ----------------------------------------------------------------------------- the measure
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_coherence_measure_matches_numpy_on_random_gradients(kind):
    weights = [torch.randn(5, 3), torch.randn(4, 2, 3, 3)]
    weights[0][0, 0] = 0.0  # sign(0) = 0 contributes nothing to the L1 gradient
    grads = [torch.randn(5, 3), torch.randn(4, 2, 3, 3)]
    reg = CoherentStrongReg(_params_with_grads(weights, grads), kind=kind, strength=0.3)
    reg.step()
    cos, ratio = _np_measures(grads, weights, kind, 0.3)
    assert reg.history[0]["cosine"] == pytest.approx(cos, rel=1e-5)
    assert reg.history[0]["ratio"] == pytest.approx(ratio, rel=1e-5)


@pytest.mark.parametrize("kind", ["l1", "l2"])
@pytest.mark.parametrize(("sign", "expected"), [(1.0, 1.0), (-1.0, -1.0)])
def test_coherence_measure_extremes_aligned_and_cancelling(kind, sign, expected):
    weights = [torch.randn(6, 4), torch.randn(3, 3)]
    reg_dir = [torch.sign(w) if kind == "l1" else w for w in weights]
    grads = [sign * 2.5 * r for r in reg_dir]  # aligned with (or against) the regulariser
    reg = CoherentStrongReg(_params_with_grads(weights, grads), kind=kind, strength=0.5)
    reg.step()
    assert reg.history[0]["cosine"] == pytest.approx(expected, abs=1e-6)
    assert reg.history[0]["ratio"] == pytest.approx(0.5 / 2.5, rel=1e-6)  # |r| / |g|


def test_coherence_statistics_hand_values():
    w = [torch.tensor([2.0, -1.0, 0.0])]
    g = [torch.tensor([1.0, 3.0, 4.0])]
    # L1: r = [1, -1, 0] -> <g, r> = -2, |g|^2 = 26, |r|^2 = 2
    assert coherence_statistics(g, w, "l1").tolist() == pytest.approx([-2.0, 26.0, 2.0])
    # L2: r = w -> <g, r> = -1, |r|^2 = 5
    assert coherence_statistics(g, w, "l2").tolist() == pytest.approx([-1.0, 26.0, 5.0])


# ----------------------------------------------------------------------------- the gate
def _gate_with_ratios(ratios, **kw):
    """Drive the gate with chosen ratios |r|/|g| by scaling a fixed L2 gradient."""
    w = torch.ones(2, 2)
    p = nn.Parameter(w.clone())
    reg = CoherentStrongReg([p], kind="l2", strength=1.0, **kw)
    states = []
    for ratio in ratios:
        p.grad = torch.ones(2, 2) / ratio  # |r| = 2, |g| = 2 / ratio
        reg.step()
        states.append(reg.is_active)
    return states, reg


def test_gate_switches_off_after_window_and_back_on():
    ratios = [1, 9, 1, 9, 9, 9, 1, 1, 9, 1]
    states, _ = _gate_with_ratios(ratios, max_ratio=4.0, window=2)
    # off after 2 consecutive incoherent steps (index 4), on after 2 coherent ones (index 7)
    assert states == [True, True, True, True, False, False, False, True, True, True]


def test_gate_without_reactivation_stays_off():
    states, _ = _gate_with_ratios([9, 9, 1, 1, 1], max_ratio=4.0, window=2, reactivate=False)
    assert states == [True, False, False, False, False]


def test_min_cosine_rule_and_delay():
    w = torch.ones(3, 1)
    p = nn.Parameter(w.clone())
    reg = CoherentStrongReg(
        [p], kind="l2", strength=1.0, max_ratio=None, min_cosine=0.0, window=1, delay=2
    )
    seen = []
    for g in (-w, -w, w, -w, w):
        p.grad = g.clone()
        reg.step()
        seen.append(reg.is_active)
    # two delayed steps off; then on (cos=+1), off (cos=-1 < 0), back on (cos=+1)
    assert seen == [False, False, True, False, True]


def test_regulariser_added_only_while_active():
    w = torch.full((2, 2), 0.5)
    p = nn.Parameter(w.clone())
    reg = CoherentStrongReg([p], kind="l2", strength=0.1, max_ratio=4.0, window=1)
    p.grad = torch.ones(2, 2)  # ratio 0.05: coherent, on
    reg.step()
    assert torch.allclose(p.grad, torch.ones(2, 2) + 0.1 * w)
    p.grad = torch.full((2, 2), 1e-4)  # ratio 500: incoherent, off at once (window=1)
    reg.step()
    assert not reg.is_active
    assert torch.equal(p.grad, torch.full((2, 2), 1e-4))


# ----------------------------------------------------------------------------- update rules
def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))


def _batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)
    ]


def test_l2_always_on_equals_sgd_weight_decay():
    ours, ref = _mlp(), _mlp()
    weights = [p for n, p in ref.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in ref.named_parameters() if n.endswith("bias")]
    opt_ref = torch.optim.SGD(
        [{"params": weights, "weight_decay": 0.05}, {"params": biases}], lr=0.1, momentum=0.9
    )
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    reg = CoherentStrongReg(ours.named_parameters(), kind="l2", strength=0.05, max_ratio=None)
    for x, y in _batches():
        for model, o in ((ours, opt), (ref, opt_ref)):
            o.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if model is ours:
                reg.step()
            o.step()
        reg.after_step()
    assert all(reg.history[i]["active"] for i in range(len(reg.history)))
    for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_prox_l1_equals_numpy_soft_threshold_and_zeros_are_exact():
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    reg = CoherentStrongReg(
        model.named_parameters(),
        kind="l1",
        strength=0.05,
        l1_mode="prox",
        optimizer=opt,
        max_ratio=None,
    )
    x, y = _batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {}
    for n, p in model.named_parameters():
        after_sgd = (p.detach() - 0.2 * p.grad).numpy().astype(np.float64)
        if n.endswith("weight"):
            after_sgd = np.sign(after_sgd) * np.maximum(np.abs(after_sgd) - 0.2 * 0.05, 0.0)
        expected[n] = after_sgd
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    reg.step()
    for n, p in model.named_parameters():  # prox mode leaves the gradient alone
        assert torch.equal(p.grad, grads_before[n])
    opt.step()
    reg.after_step()
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.detach().numpy(), expected[n], rtol=1e-5, atol=1e-7)
    w = model[0].weight.detach()
    assert int((w == 0).sum()) == int((expected["0.weight"] == 0).sum()) > 0


def test_subgradient_l1_adds_sign_and_zeroes_crossings():
    w = torch.tensor([[0.05, -0.3], [0.0, 1.0], [0.0, 0.5]])
    p = nn.Parameter(w.clone())
    opt = torch.optim.SGD([p], lr=1.0)
    reg = CoherentStrongReg([p], kind="l1", strength=0.1, max_ratio=None)
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
    reg = CoherentStrongReg([p], kind="l1", strength=0.1, max_ratio=None)
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
    assert (p[0, 2] == 0) or (p[0, 2] > 0)  # crossed zero at some step -> exact zero, never < 0


def test_default_selection_regularises_conv_and_linear_weights_only():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    reg = CoherentStrongReg(model.named_parameters(), strength=0.1)
    assert reg.names == ["0.weight", "3.weight"]
    everything = CoherentStrongReg(model.named_parameters(), strength=0.1, weights_only=False)
    assert len(everything.params) == len(list(model.parameters()))


# ----------------------------------------------------------------------------- toy problem
def _digits_run(reg_kwargs, epochs=10):
    from sklearn.datasets import load_digits

    x_np, y_np = load_digits(return_X_y=True)
    x, y = torch.tensor(x_np / 16.0, dtype=torch.float32), torch.tensor(y_np)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg = CoherentStrongReg(model.named_parameters(), kind="l1", strength=0.03, **reg_kwargs)
    gen = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=gen)
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            reg.step()
            opt.step()
            reg.after_step()
    with torch.no_grad():
        logits = model(x)
    acc = float((logits.argmax(1) == y).float().mean())
    return acc, float(nn.functional.cross_entropy(logits, y)), compression_report(model), reg


@pytest.fixture
def _one_thread():
    """Small matmuls: one thread is several times faster on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.usefixtures("_one_thread")
def test_plain_strong_l1_collapses_while_coherent_keeps_learning_and_ends_sparse():
    plain_acc, plain_loss, _, _ = _digits_run({"gate": False})
    assert plain_acc < 0.2  # chance is 0.1 on ten balanced classes
    assert plain_loss > 0.9 * math.log(10)
    acc, loss, report, reg = _digits_run({})
    assert acc > 0.6
    assert loss < 0.8 * math.log(10)
    assert report.sparsity > 0.5  # exact zeros (measured: 0.96)
    assert 0 < sum(h["active"] for h in reg.history) < len(reg.history)  # the gate acted
    on = sum(h["active"] for h in reg.history) / len(reg.history)
    print(
        f"plain: acc {plain_acc:.3f}; coherent: acc {acc:.3f}, sparsity {report.sparsity:.3f}, "
        f"compression {report.compression_ratio:.1f}x, regulariser on {on:.2f} of the steps"
    )


# ----------------------------------------------------------------------------- state
def _train(model, opt, reg, batches):
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        reg.step()
        opt.step()
        reg.after_step()


def test_state_dict_resume_equals_uninterrupted_run():
    batches = _batches(12)
    kw = {"kind": "l1", "strength": 0.05, "max_ratio": 1.0, "window": 2}
    full = _mlp()
    opt = torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9)
    reg = CoherentStrongReg(full.named_parameters(), **kw)
    _train(full, opt, reg, batches)
    assert len({h["active"] for h in reg.history}) == 2  # the gate switched during the run

    part = _mlp()
    opt1 = torch.optim.SGD(part.parameters(), lr=0.1, momentum=0.9)
    reg1 = CoherentStrongReg(part.named_parameters(), **kw)
    _train(part, opt1, reg1, batches[:5])
    saved = copy.deepcopy(
        {"model": part.state_dict(), "opt": opt1.state_dict(), "reg": reg1.state_dict()}
    )
    resumed = _mlp(seed=123)
    resumed.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    reg2 = CoherentStrongReg(resumed.named_parameters(), **kw)
    reg2.load_state_dict(saved["reg"])
    _train(resumed, opt2, reg2, batches[5:])
    assert reg2.history == reg.history
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


def test_state_dict_is_plain_data():
    reg = CoherentStrongReg([nn.Parameter(torch.ones(2, 2))], strength=0.1)
    reg.params[0].grad = torch.ones(2, 2)
    reg.step()
    state = reg.state_dict()
    plain = (int, float, bool, str, list, dict)

    def check(obj):
        assert isinstance(obj, plain), type(obj)
        if isinstance(obj, dict):
            for v in obj.values():
                check(v)
        if isinstance(obj, list):
            for v in obj:
                check(v)

    check(state)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strength": -0.1}, "strength"),
        ({"strength": float("nan")}, "strength"),
        ({"strength": 0.1, "kind": "l3"}, "kind"),
        ({"strength": 0.1, "l1_mode": "clip"}, "l1_mode"),
        ({"strength": 0.1, "l1_mode": "prox"}, "lr"),
        ({"strength": 0.1, "window": 0}, "window"),
        ({"strength": 0.1, "delay": -1}, "delay"),
        ({"strength": 0.1, "min_cosine": 2.0}, "min_cosine"),
        ({"strength": 0.1, "max_ratio": 0.0}, "max_ratio"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CoherentStrongReg([nn.Parameter(torch.ones(2, 2))], **kwargs)


def test_bad_params_raise():
    with pytest.raises(TypeError, match="params"):
        CoherentStrongReg(torch.ones(2, 2), strength=0.1)
    with pytest.raises(ValueError, match="selected no tensor"):
        CoherentStrongReg([("fc.bias", nn.Parameter(torch.ones(3)))], strength=0.1)


def test_step_without_grad_raises_and_changes_nothing():
    a, b = nn.Parameter(torch.ones(2, 2)), nn.Parameter(torch.ones(2, 2))
    reg = CoherentStrongReg([("a", a), ("b", b)], strength=0.1)
    a.grad = torch.ones(2, 2)
    with pytest.raises(RuntimeError, match=r"\['b'\]"):
        reg.step()
    assert torch.equal(a.grad, torch.ones(2, 2))
    assert reg.num_steps == 0
    assert reg.history == []


def test_load_state_dict_rejects_bad_state_and_keeps_old_one():
    reg = CoherentStrongReg([nn.Parameter(torch.ones(2, 2))], strength=0.1)
    before = reg.state_dict()
    with pytest.raises(ValueError, match="state"):
        reg.load_state_dict({"num_steps": 3})
    assert reg.state_dict() == before


# ----------------------------------------------------------------------------- report
def test_compression_report_counts_match_numpy():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.1] = 0.0
        model[2].weight[:, :7] = 0.0
    w0, w2 = model[0].weight.detach().numpy(), model[2].weight.detach().numpy()
    report = compression_report(model)
    assert [x.name for x in report.layers] == ["0.weight", "2.weight"]
    zeros = int((w0 == 0).sum() + (w2 == 0).sum())
    assert report.zeros == zeros
    assert report.total == 300
    assert report.compression_ratio == pytest.approx(300 / (300 - zeros))
    thr = compression_report(model, threshold=0.2)
    assert thr.zeros == int((np.abs(w0) <= 0.2).sum() + (np.abs(w2) <= 0.2).sum())
    text = str(report)
    for needle in ("0.weight", "total", "compression ratio"):
        assert needle in text


def test_compression_report_all_zero_and_bad_threshold():
    layer = nn.Linear(3, 3)
    nn.init.zeros_(layer.weight)
    assert compression_report(layer).compression_ratio == math.inf
    with pytest.raises(ValueError, match="threshold"):
        compression_report(layer, threshold=-1.0)


def test_soft_threshold_matches_numpy():
    ts = [torch.randn(7, 3), torch.randn(5)]
    ref = [np.sign(t.numpy()) * np.maximum(np.abs(t.numpy()) - 0.4, 0) for t in ts]
    soft_threshold_(ts, 0.4)
    for t, r in zip(ts, ref, strict=True):
        np.testing.assert_allclose(t.numpy(), r, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- distributed
def _ddp_worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
    reg = CoherentStrongReg(model.named_parameters(), kind="l1", strength=0.05, max_ratio=1.0)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank sees different data
    for _ in range(10):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        reg.step()
        opt.step()
        reg.after_step()
    return {"history": reg.history, "params": [p.detach().clone() for p in model.parameters()]}


@pytest.mark.distributed
def test_ddp_decisions_and_weights_identical_on_every_rank():
    r0, r1 = run_distributed(_ddp_worker)
    assert r0["history"] == r1["history"]
    assert len({h["active"] for h in r0["history"]}) == 2  # the gate switched at least once
    for a, b in zip(r0["params"], r1["params"], strict=True):
        assert torch.equal(a, b)


def _coherent_run(
    l1_mode: str, max_ratio: float, rank: int | None, world_size: int = 2, hsdp: bool = False
) -> dict:
    """10 steps on a global batch of 32; rank None: one process, else FSDP2 with an equal
    part per rank (``hsdp``: a 2 x 2 mesh, replicated across its first dimension)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    if rank is not None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        if hsdp:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
        else:
            mesh = init_device_mesh("cpu", (world_size,))
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reg = CoherentStrongReg(
        model.named_parameters(), kind="l1", strength=0.05, max_ratio=max_ratio,
        l1_mode=l1_mode, optimizer=opt,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(100)
    part = 32 // world_size
    rows = slice(None) if rank is None else slice(part * rank, part * rank + part)
    for _ in range(10):
        x, y = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        reg.step()
        opt.step()
        reg.after_step()
    report = compression_report(model)  # counts every rank's slice under FSDP2
    params = [p.detach() for p in model.parameters()]
    if rank is not None:
        params = [p.full_tensor() for p in params]
    return {"history": reg.history, "params": params, "zeros": report.zeros}


def _fsdp_worker(rank: int, world_size: int, hsdp: bool = False) -> dict:
    return {case: _coherent_run(*case, rank, world_size, hsdp) for case in _FSDP_CASES}


# max_ratio 1: the gate switches; 4: it stays on and makes exact zeros
_FSDP_CASES = [(mode, ratio) for mode in ("subgradient", "prox") for ratio in (1.0, 4.0)]


@pytest.mark.distributed
@pytest.mark.parametrize("hsdp", [False, True], ids=["fsdp2", "hsdp-2x2"])
@needs_fsdp2
def test_fsdp2_sharded_parameters_give_the_single_process_run(hsdp):
    # HSDP: sums over the sharded mesh dimension only (the replicated one holds copies)
    ranks = run_distributed(_fsdp_worker, hsdp, world_size=4 if hsdp else 2)
    for case in _FSDP_CASES:
        ref = _coherent_run(*case, None)
        if case[1] == 1.0:
            assert len({h["active"] for h in ref["history"]}) == 2  # the gate switched
        else:
            assert ref["zeros"] > 0
        for out in ranks:
            got = out[case]
            assert [h["active"] for h in got["history"]] == [h["active"] for h in ref["history"]]
            for key in ("cosine", "ratio", "grad_norm"):  # whole-tensor statistics, not a shard's
                a = [h[key] for h in got["history"]]
                b = [h[key] for h in ref["history"]]
                assert a == pytest.approx(b, rel=1e-4, abs=1e-7), key  # cosine can be ~0
            for a, b in zip(got["params"], ref["params"], strict=True):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
                assert torch.equal(a == 0, b == 0)  # the same exact zeros
            zeros = sum(int((p == 0).sum()) for p in ref["params"] if p.ndim == 2)
            assert got["zeros"] == ref["zeros"] == zeros


# ----------------------------------------------------------------------------- example
@pytest.mark.slow
def test_example_smoke_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_RECAL_COMPILE": "0"}
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "coherent_reg.py"),
            "--smoke",
            "--no-progress",
            "--out",
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compression" in out.stdout
    assert any(tmp_path.glob("*.png"))


def test_tensors_frozen_after_construction_are_skipped_not_an_error():
    # RandomLayerTraining and RIFLE-style fine-tuning freeze layers between steps
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    reg = CoherentStrongReg(model.named_parameters(), kind="l2", strength=0.5, gate=False)
    model[0].weight.requires_grad_(False)
    frozen_before = model[0].weight.detach().clone()
    model(torch.randn(5, 3)).sum().backward()
    loss_grad = model[1].weight.grad.clone()
    reg.step()
    assert model[0].weight.grad is None
    torch.testing.assert_close(model[1].weight.grad, loss_grad + 0.5 * model[1].weight)
    assert torch.equal(model[0].weight, frozen_before)
