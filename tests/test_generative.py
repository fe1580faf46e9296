"""Tests for GenerativeGradientLoss, ReferenceDecoder and first_layer_filter_stats (GGR)."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from tests.badcalls import assert_same, snapshot
from tests.distributed import run_distributed
from torch_recal import (
    GenerativeGradientLoss,
    ReferenceDecoder,
    first_layer_filter_stats,
)
from torch_recal.functional import gradient_discrepancy

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------
# A tiny float64 network written with functional ops, so its parameters can be gradchecked.


def _tiny(seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(2, 1, 3, 3, generator=g, dtype=dtype).requires_grad_()
    w2 = (0.5 * torch.randn(3, 8, generator=g, dtype=dtype)).requires_grad_()
    x = torch.randn(4, 1, 4, 4, generator=g, dtype=dtype)
    y = torch.tensor([0, 1, 2, 1])
    return w1, w2, x, y


def _ce(w1: torch.Tensor, w2: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    h = torch.tanh(F.conv2d(x, w1)).flatten(1)
    return F.cross_entropy(F.linear(h, w2), y)


def _fd_grad(fn, w: torch.Tensor, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function of ``w`` (independent of autograd)."""
    base = w.detach().clone()
    out = np.zeros(base.numel())
    flat = base.view(-1)
    for i in range(flat.numel()):
        plus, minus = base.clone(), base.clone()
        plus.view(-1)[i] += h
        minus.view(-1)[i] -= h
        out[i] = (float(fn(plus)) - float(fn(minus))) / (2 * h)
    return out.reshape(base.shape)


def _hand_discrepancy(a: np.ndarray, b: np.ndarray, kind: str) -> float:
    a, b = a.ravel(), b.ravel()
    if kind == "cosine":
        return 1.0 - float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    if kind == "l2":
        return float(np.mean((a - b) ** 2))
    return float(np.mean(np.abs(a - b)))


@pytest.mark.parametrize("kind", ["cosine", "l2", "l1"])
def test_term_value_matches_finite_difference_gradient_and_hand_formula(kind: str) -> None:
    w1, w2, x, y = _tiny()
    ref = torch.randn(w1.shape, dtype=torch.float64) * 0.1
    ggr = GenerativeGradientLoss(w1, ref, discrepancy=kind, weight=0.3)
    term = ggr(_ce(w1, w2, x, y), x)
    with torch.no_grad():
        g_fd = _fd_grad(lambda w: _ce(w, w2, x, y), w1)
    expected = 0.3 * _hand_discrepancy(g_fd, ref.numpy(), kind)
    assert term.item() == pytest.approx(expected, rel=1e-6, abs=1e-10)


@pytest.mark.parametrize("kind", ["cosine", "l2", "l1"])
def test_term_gradient_passes_gradcheck(kind: str) -> None:
    w1, w2, x, y = _tiny(1)
    ref = torch.randn(w1.shape, dtype=torch.float64) * 0.1
    ggr = GenerativeGradientLoss(w1, ref, discrepancy=kind, weight=2.0)

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ggr(_ce(a, b, x, y), x)

    assert torch.autograd.gradcheck(fn, (w1, w2), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


# ------------------------------------------------------------------------------------------
# The fused batch-norm and GELU double backwards (fused_double_backward=True, the default)


def _bn_net(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """Train-mode BatchNorm2d (affine and not), BatchNorm1d, and one BatchNorm2d in eval mode."""
    torch.manual_seed(3)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4, affine=False), nn.Tanh(),
        nn.Conv2d(4, 3, 1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
        nn.Linear(3 * 4 * 4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3),
    ).to(dtype)  # fmt: skip
    net[7].eval()  # keeps PyTorch's formula (running statistics, not the batch's)
    with torch.no_grad():
        net[7].running_mean.uniform_(-1, 1)
        net[7].running_var.uniform_(0.5, 2)
    return net


def _ggr_grads(
    net: nn.Module,
    fused: bool,
    dtype: torch.dtype,
    *,
    seed: int = 4,
    scale: float = 3.0,
    loc: float = 5.0,  # far from zero mean
) -> tuple[float, list[torch.Tensor]]:
    """The term and the parameter gradients of one CE + GGR step on ``scale * randn + loc``."""
    g = torch.Generator().manual_seed(seed)
    x = (scale * torch.randn(6, 2, 6, 6, generator=g) + loc).to(dtype)
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ref = torch.randn(net[0].weight.shape, generator=g).to(dtype)
    ggr = GenerativeGradientLoss(net[0].weight, ref, weight=3.0, fused_double_backward=fused)
    net.zero_grad()
    loss = F.cross_entropy(net(x), y)
    term = ggr(loss, x)
    (loss + term).backward()
    return term.item(), [p.grad.clone() for p in net.parameters()]


def test_fused_batchnorm_double_backward_equals_pytorchs_formula() -> None:
    """Reference: PyTorch's own batchnorm_double_backward (fused_double_backward=False), float64."""
    net = _bn_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    term_ref, grads_ref = _ggr_grads(net, fused=False, dtype=torch.float64)
    net.load_state_dict(state)
    term, grads = _ggr_grads(net, fused=True, dtype=torch.float64)
    assert term == pytest.approx(term_ref, rel=1e-13)
    for (name, _), got, want in zip(net.named_parameters(), grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12, msg=name)
    assert max(float(g.abs().max()) for g in grads) > 1e-3  # the term reaches the network


def test_fused_batchnorm_float32_close_to_pytorchs_formula() -> None:
    net = _bn_net(torch.float32)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    _, grads_ref = _ggr_grads(net, fused=False, dtype=torch.float32)
    net.load_state_dict(state)
    _, grads = _ggr_grads(net, fused=True, dtype=torch.float32)
    scale = max(float(g.abs().max()) for g in grads_ref)  # conv biases before BN: grad ~ 0
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * scale)


def test_fused_batchnorm_term_gradient_passes_gradcheck() -> None:
    """Finite differences (independent of any double-backward formula) through batch norm."""
    g = torch.Generator().manual_seed(5)
    w1 = torch.randn(3, 1, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    gamma = (1 + 0.3 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    w2 = (0.5 * torch.randn(3, 12, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    ggr = GenerativeGradientLoss(w1, torch.randn(w1.shape, generator=g, dtype=torch.float64))

    def fn(a: torch.Tensor, gm: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = F.batch_norm(F.conv2d(x, a), None, None, gm, None, training=True)
        h = F.avg_pool2d(torch.tanh(h), 2).flatten(1)
        return ggr(F.cross_entropy(F.linear(h, b), y), x)

    assert torch.autograd.gradcheck(fn, (w1, gamma, w2), eps=1e-6, atol=1e-6, rtol=1e-4)


def _node_names(t: torch.Tensor) -> set[str]:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            stack.extend(nxt for nxt, _ in node.next_functions)
    return {node.name() for node in seen}


def test_fused_batchnorm_hooks_only_train_mode_nodes_and_are_removed_also_on_error() -> None:
    from torch_recal._double_backward import fused_double_backward

    net = _bn_net()
    x, y = torch.randn(6, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    loss = F.cross_entropy(net(x), y)
    w = net[0].weight
    with fused_double_backward(loss) as hooked:
        (g,) = torch.autograd.grad(loss, w, create_graph=True)
    assert hooked == 3  # three train-mode batch norms; the eval-mode one is left alone
    assert "_BatchNormInputGradBackward" in _node_names(g)
    assert "NativeBatchNormBackwardBackward0" in _node_names(g)  # the eval-mode one
    with pytest.raises(RuntimeError, match="boom"), fused_double_backward(loss):
        raise RuntimeError("boom")
    (g,) = torch.autograd.grad(loss, w, create_graph=True)  # hooks gone: PyTorch's formula
    assert "_BatchNormInputGradBackward" not in _node_names(g)
    # a plain backward through hooked nodes (no create_graph) is untouched
    with fused_double_backward(loss):
        (g,) = torch.autograd.grad(loss, w, retain_graph=True)
    assert g.grad_fn is None


def _gelu_reference(
    a: torch.Tensor, g: torch.Tensor, x: torch.Tensor, approximate: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """GELU's double backward by central finite differences of its (first) backward."""
    step = 1e-6
    bwd = torch.ops.aten.gelu_backward
    grad_g = a * bwd(torch.ones_like(x), x, approximate=approximate)
    d_bwd = bwd(g, x + step, approximate=approximate) - bwd(g, x - step, approximate=approximate)
    return grad_g, a * d_bwd / (2 * step)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_double_backward_kernel_equals_finite_differences_and_pytorch(
    approximate: str,
) -> None:
    from torch_recal._double_backward import gelu_double_backward

    gen = torch.Generator().manual_seed(8)
    x = torch.linspace(-7, 7, 301, dtype=torch.float64)  # both tails and the kink region
    a, g = (torch.randn(301, generator=gen, dtype=torch.float64) for _ in range(2))
    grad_g, grad_x = gelu_double_backward(a, g, x, approximate)
    want_g, want_x = _gelu_reference(a, g, x, approximate)
    torch.testing.assert_close(grad_g, want_g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_x, want_x, rtol=1e-6, atol=1e-8)
    # PyTorch's own gelu_double_backward
    xl, gl = x.clone().requires_grad_(), g.clone().requires_grad_()
    (dx,) = torch.autograd.grad(F.gelu(xl, approximate=approximate), xl, gl, create_graph=True)
    pt_g, pt_x = torch.autograd.grad(dx, (gl, xl), a)
    torch.testing.assert_close(grad_g, pt_g, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_x, pt_x, rtol=1e-10, atol=1e-12)


class Transpose(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2)


def _gelu_net(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """A ViT-style MLP on patch embeddings: exact and tanh GELUs, a LayerNorm, a batch norm."""
    torch.manual_seed(9)
    return nn.Sequential(
        nn.Conv2d(2, 6, 2, stride=2), nn.BatchNorm2d(6), nn.Flatten(2), Transpose(),
        nn.LayerNorm(6), nn.Linear(6, 12), nn.GELU(), nn.Linear(12, 6),
        nn.GELU(approximate="tanh"), nn.Flatten(), nn.Linear(6 * 9, 3),
    ).to(dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_gelu_double_backward_equals_pytorchs_formula(dtype: torch.dtype) -> None:
    net = _gelu_net(dtype)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    _, grads_ref = _ggr_grads(net, fused=False, dtype=dtype, seed=10, scale=2.0, loc=0.0)
    net.load_state_dict(state)
    _, grads = _ggr_grads(net, fused=True, dtype=dtype, seed=10, scale=2.0, loc=0.0)
    tol = {"rtol": 1e-10, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-4}
    scale = max(float(g.abs().max()) for g in grads_ref)
    for (name, _), got, want in zip(net.named_parameters(), grads, grads_ref, strict=True):
        atol = tol.get("atol", 1e-5 * scale)
        torch.testing.assert_close(got, want, rtol=tol["rtol"], atol=atol, msg=name)


def test_fused_gelu_term_gradient_passes_gradcheck() -> None:
    """Finite differences of the whole term through both GELU forms."""
    g = torch.Generator().manual_seed(11)
    w1 = torch.randn(4, 1, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = (0.5 * torch.randn(3, 36, generator=g, dtype=torch.float64)).requires_grad_()
    x = torch.randn(5, 1, 6, 6, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    ggr = GenerativeGradientLoss(w1, torch.randn(w1.shape, generator=g, dtype=torch.float64))

    def fn(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.conv2d(x, a, stride=2))
        h = F.gelu(2 * h - 0.5, approximate="tanh").flatten(1)
        return ggr(F.cross_entropy(F.linear(h, b), y), x)

    assert torch.autograd.gradcheck(fn, (w1, w2), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_fused_hooks_count_gelu_nodes() -> None:
    from torch_recal._double_backward import fused_double_backward

    net = _gelu_net()
    loss = F.cross_entropy(net(torch.randn(6, 2, 6, 6, dtype=torch.float64)), torch.arange(6) % 3)
    with fused_double_backward(loss) as hooked:
        (g,) = torch.autograd.grad(loss, net[0].weight, create_graph=True)
    assert hooked == 3  # two GELUs and the batch norm
    names = _node_names(g)
    assert "_GeluInputGradBackward" in names and "GeluBackwardBackward0" not in names


class _OnceDifferentiableSquare(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        ctx.save_for_backward(x)
        return x * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return 2 * x * g


class _TinyAttention(nn.Module):
    """conv -> 16 tokens of width 4 -> scaled_dot_product_attention -> mean -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.conv(x).flatten(2).transpose(1, 2).contiguous().unsqueeze(1)  # (N, 1, 16, 4)
        return self.fc(F.scaled_dot_product_attention(t, t, t).mean((1, 2)))


def test_an_op_without_double_backward_raises_a_clear_error_before_any_state_changes() -> None:
    w1, w2, x, y = _tiny()
    ggr = GenerativeGradientLoss(w1, torch.randn(w1.shape, dtype=torch.float64), ema=0.5)

    def ce(a: torch.Tensor) -> torch.Tensor:
        h = _OnceDifferentiableSquare.apply(F.conv2d(x, a)).flatten(1)
        return F.cross_entropy(F.linear(h, w2), y)

    with pytest.raises(ValueError, match="cannot be differentiated twice.*once_differentiable"):
        ggr(ce(w1), x)
    assert (ggr.num_steps, ggr.reference_ema, ggr.last_reference) == (0, None, None)


def test_fused_attention_is_refused_with_the_fix_and_the_math_kernel_works() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = _TinyAttention()
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2])
    ggr = GenerativeGradientLoss(model.conv.weight, torch.randn(4, 1, 3, 3))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the fused CPU kernel
        loss = F.cross_entropy(model(x), y)
    with pytest.raises(ValueError, match=r"ScaledDotProductFlashAttention.*SDPBackend\.MATH"):
        ggr(loss, x)
    assert ggr.num_steps == 0
    with sdpa_kernel(SDPBackend.MATH):
        loss = F.cross_entropy(model(x), y)
    (loss + ggr(loss, x)).backward()
    assert ggr.num_steps == 1
    assert model.fc.weight.grad is not None and model.conv.weight.grad is not None


def test_cosine_is_zero_when_parallel_two_when_opposite_and_scale_invariant() -> None:
    w1, w2, x, y = _tiny(2)
    with torch.no_grad():
        g = torch.as_tensor(_fd_grad(lambda w: _ce(w, w2, x, y), w1))

    def term(ref: torch.Tensor) -> float:
        return GenerativeGradientLoss(w1, ref, weight=1.0)(_ce(w1, w2, x, y), x).item()

    assert term(5.0 * g) == pytest.approx(0.0, abs=1e-8)
    assert term(-0.01 * g) == pytest.approx(2.0, abs=1e-8)
    other = torch.randn(w1.shape, dtype=torch.float64)
    assert 0.05 < term(other) < 1.95
    assert term(7.3 * other) == pytest.approx(term(other), rel=1e-12)


def test_fixed_reference_needs_no_batch_and_is_cast_to_the_target_dtype() -> None:
    w1, w2, x, y = _tiny(6)
    ref32 = torch.randn(w1.shape, dtype=torch.float32)
    term = GenerativeGradientLoss(w1, ref32, weight=1.0)(_ce(w1, w2, x, y))  # no x needed
    assert term.dtype == torch.float64
    with torch.no_grad():
        g_fd = _fd_grad(lambda w: _ce(w, w2, x, y), w1)
    expected = _hand_discrepancy(g_fd, ref32.double().numpy(), "cosine")
    assert term.item() == pytest.approx(expected, rel=1e-6)


def test_gradient_discrepancy_hand_values() -> None:
    a = torch.tensor([3.0, 4.0])
    b = torch.tensor([4.0, -3.0])  # orthogonal
    assert gradient_discrepancy(a, b, "cosine").item() == pytest.approx(1.0)
    assert gradient_discrepancy(a, b, "l2").item() == pytest.approx((1 + 49) / 2)
    assert gradient_discrepancy(a, b, "l1").item() == pytest.approx((1 + 7) / 2)
    assert gradient_discrepancy(torch.zeros(2), b, "cosine").item() == pytest.approx(1.0)
    assert gradient_discrepancy(a, -2 * a).item() == pytest.approx(2.0)


def test_gradient_discrepancy_flattens_computes_in_float32_and_returns_the_input_dtype() -> None:
    g = torch.Generator().manual_seed(12)
    a64, b64 = (torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    for kind in ("cosine", "l2", "l1"):
        want = _hand_discrepancy(a64.numpy(), b64.numpy(), kind)
        assert gradient_discrepancy(a64, b64, kind).item() == pytest.approx(want, rel=1e-12)
        half = gradient_discrepancy(a64.half(), b64.half(), kind)
        assert half.dtype == torch.float16
        assert half.item() == pytest.approx(want, rel=2e-3)
        mixed = gradient_discrepancy(a64.float(), b64.bfloat16(), kind)
        assert mixed.dtype == torch.float32
    assert torch.isnan(gradient_discrepancy(torch.full((2,), float("nan")), torch.ones(2)))


def test_discrepancy_fn_is_kept_as_an_alias() -> None:
    from torch_recal.generative import discrepancy_fn

    assert discrepancy_fn is gradient_discrepancy


def test_term_backward_reaches_every_parameter_through_double_backprop() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3)
    )
    x, y = torch.randn(5, 1, 6, 6), torch.tensor([0, 1, 2, 0, 1])
    ggr = GenerativeGradientLoss(model[0].weight, torch.randn(4, 1, 3, 3))
    loss = F.cross_entropy(model(x), y)
    term = ggr(loss, x)
    term.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


def test_every_applies_on_exactly_the_right_steps_and_skips_build_no_graph() -> None:
    w1, w2, x, y = _tiny(3)
    calls = []

    def reference(batch: torch.Tensor) -> torch.Tensor:
        calls.append(batch)
        return torch.ones(w1.shape, dtype=torch.float64)

    ggr = GenerativeGradientLoss(w1, reference, every=3)
    applied = []
    for step in range(8):
        assert ggr.will_apply() == (step % 3 == 0)
        term = ggr(_ce(w1, w2, x, y), x)
        if term.requires_grad:
            applied.append(step)
            assert term.item() > 0
        else:
            assert term.grad_fn is None
            assert term.item() == 0.0
            assert term.dim() == 0
    assert applied == [0, 3, 6]
    assert len(calls) == 3  # the reference is not computed on skipped steps
    assert ggr.num_steps == 8


def test_ema_follows_hand_formula_over_applied_steps() -> None:
    w1, w2, x, y = _tiny(4)
    refs = [torch.randn(w1.shape, dtype=torch.float64) for _ in range(3)]
    it = iter(refs)
    ggr = GenerativeGradientLoss(w1, lambda _x: next(it), ema=0.75, every=2)
    for _ in range(5):  # applied on calls 0, 2, 4
        ggr(_ce(w1, w2, x, y), x)
    r0, r1, r2 = refs
    expected = 0.75 * (0.75 * r0 + 0.25 * r1) + 0.25 * r2
    torch.testing.assert_close(ggr.last_reference, expected)


def test_state_dict_round_trip_resumes_like_an_uninterrupted_run() -> None:
    w1, w2, x, y = _tiny(5)
    refs = [torch.randn(w1.shape, dtype=torch.float64) for _ in range(8)]

    def make() -> GenerativeGradientLoss:
        counter = {"i": 0}

        def reference(_x: torch.Tensor) -> torch.Tensor:
            counter["i"] += 1
            return refs[counter["i"] - 1]

        return GenerativeGradientLoss(w1, reference, ema=0.5, every=2)

    full = make()
    values = [full(_ce(w1, w2, x, y), x).item() for _ in range(8)]

    first = make()
    for _ in range(3):
        first(_ce(w1, w2, x, y), x)
    state = first.state_dict()
    assert set(state) == {"num_steps", "num_ema_updates", "reference_ema"}
    assert (state["num_steps"], state["num_ema_updates"]) == (3, 2)  # applied on calls 0, 2
    assert isinstance(state["num_steps"], int)
    assert isinstance(state["reference_ema"], torch.Tensor)
    resumed = make()
    resumed.reference = (lambda it: lambda _x: next(it))(iter(refs[2:]))
    resumed.load_state_dict(state)
    rest = [resumed(_ce(w1, w2, x, y), x).item() for _ in range(5)]
    assert rest == pytest.approx(values[3:], rel=1e-12)


def _ggr_with_average() -> tuple[GenerativeGradientLoss, torch.Tensor]:
    """A GGR with ema=0.9 after one applied step, and a copy of its running average."""
    w1, w2, x, y = _tiny()
    ref = torch.randn(w1.shape, dtype=torch.float64)
    ggr = GenerativeGradientLoss(w1, lambda _x: ref, ema=0.9, every=2)
    ggr(_ce(w1, w2, x, y), x)
    assert ggr.reference_ema is not None
    return ggr, ggr.reference_ema.clone()


def test_load_state_dict_rejects_bad_or_partial_state_and_changes_nothing() -> None:
    ggr, average = _ggr_with_average()
    good = ggr.state_dict()
    nan = average.clone()
    nan[0, 0, 0, 0] = float("nan")
    bad_states = [
        ({"step": 7}, ValueError),  # the old key (before 0.1) used to wipe the average
        ({"num_steps": 7}, ValueError),  # partial
        ({**good, "num_steps": -1}, ValueError),
        ({**good, "num_steps": 2**40}, ValueError),
        ({**good, "num_steps": 1.0}, TypeError),
        ({**good, "num_ema_updates": 5}, ValueError),  # more updates than calls
        ({**good, "reference_ema": nan}, ValueError),
        ({**good, "reference_ema": average[:1]}, ValueError),
        ({**good, "reference_ema": average.int()}, TypeError),
        ({**good, "reference_ema": None}, ValueError),  # one update but no average
        ({**good, "num_ema_updates": 0}, ValueError),  # an average but no update
        ({**good, "every": 2}, ValueError),  # options are the constructor's, not state
        ("num_steps", TypeError),
    ]
    for state, error in bad_states:
        with pytest.raises(error):
            ggr.load_state_dict(state)  # type: ignore[arg-type]
        assert ggr.num_steps == 1 and ggr.num_ema_updates == 1
        assert torch.equal(ggr.reference_ema, average)
    no_average = GenerativeGradientLoss(ggr.target, lambda _x: average)  # ema=None
    with pytest.raises(ValueError, match="ema=None"):
        no_average.load_state_dict(good)
    assert no_average.state_dict() == {"num_steps": 0, "num_ema_updates": 0, "reference_ema": None}
    ggr.load_state_dict({**good, "reference_ema": good["reference_ema"].float()})  # cast back
    assert ggr.reference_ema.dtype == torch.float64
    torch.testing.assert_close(ggr.reference_ema, average, rtol=1e-6, atol=0)


def test_step_is_a_read_only_deprecated_alias_of_num_steps() -> None:
    ggr, _ = _ggr_with_average()
    with pytest.warns(DeprecationWarning, match="num_steps"):
        assert ggr.step == 1
    with pytest.raises(AttributeError):
        ggr.step = 5  # type: ignore[misc]
    assert ggr.num_steps == 1


def test_options_set_between_steps_are_checked_and_ema_none_drops_the_average() -> None:
    ggr, average = _ggr_with_average()
    for name, bad, error in [("every", 0, ValueError), ("every", 2.0, TypeError),
                             ("weight", -1.0, ValueError), ("weight", float("nan"), ValueError),
                             ("ema", 1.0, ValueError), ("ema", "0.9", TypeError),
                             ("discrepancy", "kl", ValueError), ("eps", 0.0, ValueError),
                             ("sync", 1, TypeError), ("fused_double_backward", "no", TypeError),
                             ]:  # fmt: skip
        before = getattr(ggr, name)
        with pytest.raises(error, match=f"`{name}`"):
            setattr(ggr, name, bad)
        assert getattr(ggr, name) == before
    assert torch.equal(ggr.reference_ema, average)
    ggr.every, ggr.weight, ggr.ema = 3, 2, 0.5
    assert (ggr.every, ggr.weight, ggr.ema) == (3, 2.0, 0.5)
    assert isinstance(ggr.weight, float)
    assert torch.equal(ggr.reference_ema, average)  # a new beta keeps the average
    ggr.ema = None
    assert (ggr.reference_ema, ggr.num_ema_updates) == (None, 0)
    assert ggr.num_steps == 1


# ------------------------------------------------------------------------------------------
# Errors


def test_bad_constructor_arguments_raise_clear_errors() -> None:
    w1, *_ = _tiny()
    ref = torch.zeros(w1.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="weight"):
        GenerativeGradientLoss(w1, ref, weight=-0.1)
    with pytest.raises(ValueError, match="shape"):
        GenerativeGradientLoss(w1, torch.zeros(2, 1, 5, 5))
    with pytest.raises(ValueError, match="leaf"):
        GenerativeGradientLoss(w1 * 2, ref)
    with pytest.raises(ValueError, match="requires_grad"):
        GenerativeGradientLoss(w1.detach(), ref)
    with pytest.raises(TypeError, match="target"):
        GenerativeGradientLoss(nn.Conv2d(1, 2, 3), ref)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="discrepancy"):
        GenerativeGradientLoss(w1, ref, discrepancy="kl")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="every"):
        GenerativeGradientLoss(w1, ref, every=0)
    with pytest.raises(ValueError, match="ema"):
        GenerativeGradientLoss(w1, ref, ema=1.0)
    with pytest.raises(TypeError, match="reference"):
        GenerativeGradientLoss(w1, 3.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="weight shape"):
        GenerativeGradientLoss(w1, ReferenceDecoder(1, 3, 3))
    with pytest.raises(ValueError, match="finite"):
        GenerativeGradientLoss(w1, torch.full(w1.shape, float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="fused_double_backward"):
        GenerativeGradientLoss(w1, ref, fused_double_backward=1)  # type: ignore[arg-type]


def test_bad_call_arguments_raise_and_leave_state_unchanged() -> None:
    w1, w2, x, y = _tiny()
    other = torch.randn(w1.shape, dtype=torch.float64, requires_grad=True)
    ggr = GenerativeGradientLoss(w1, lambda _x: torch.zeros(3, 3), ema=0.9)
    per_sample = F.cross_entropy(F.linear(x.flatten(1)[:, :8], w2), y, reduction="none")
    with pytest.raises(ValueError, match="scalar"):
        ggr(per_sample, x)
    with pytest.raises(ValueError, match="require grad"):
        ggr(_ce(w1, w2, x, y).detach(), x)
    with pytest.raises(ValueError, match=r"expected a tensor of the target's shape"):
        ggr(_ce(w1, w2, x, y), x)
    assert ggr.num_steps == 0
    assert ggr.reference_ema is None
    ggr.reference = lambda _x: torch.zeros(w1.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not depend on `target`"):
        ggr(_ce(other, w2, x, y), x)  # the loss never used w1
    with pytest.raises(TypeError, match="`x`"):
        ggr(_ce(w1, w2, x, y))
    with pytest.raises(ValueError, match="`x` must be a non-empty batch"):
        ggr(_ce(w1, w2, x, y), x[:0])
    with pytest.raises(TypeError, match="`scaler`"):
        ggr(_ce(w1, w2, x, y), x, scaler=2.0**16)  # type: ignore[arg-type]
    assert ggr.num_steps == 0
    assert ggr.reference_ema is None


# ------------------------------------------------------------------------------------------
# Non-finite values (docs/conventions.md, rule 3)


def _call_recording_warnings(ggr, *args, **kwargs) -> tuple[torch.Tensor, list]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        term = ggr(*args, **kwargs)
    return term, caught


def test_one_nan_batch_does_not_poison_the_average_and_gives_a_zero_term() -> None:
    """Reference: the hand EMA over the finite references only."""
    w1, w2, x, y = _tiny(7)
    refs = [torch.randn(w1.shape, dtype=torch.float64) for _ in range(3)]
    it = iter(refs)

    def reference(batch: torch.Tensor) -> torch.Tensor:  # NaN in, NaN out, like a decoder
        return next(it) if torch.isfinite(batch).all() else torch.full_like(refs[0], math.nan)

    nan_batch = x.clone()
    nan_batch[0, 0, 0, 0] = math.nan
    ggr = GenerativeGradientLoss(w1, reference, ema=0.9, weight=1.0)
    terms = []
    for batch in (x, nan_batch, x, x):
        term, caught = _call_recording_warnings(ggr, _ce(w1, w2, batch, y), batch)
        terms.append(term)
        if batch is nan_batch:
            assert [w.category for w in caught] == [RuntimeWarning]
            assert "non-finite reference gradient" in str(caught[0].message)
            assert term.item() == 0.0 and term.grad_fn is None
        else:
            assert not caught
    assert (ggr.num_steps, ggr.num_ema_updates) == (4, 3)  # the NaN step counts, no update
    r0, r1, r2 = refs
    expected = 0.9 * (0.9 * r0 + 0.1 * r1) + 0.1 * r2
    torch.testing.assert_close(ggr.reference_ema, expected)
    torch.testing.assert_close(ggr.last_reference, expected)
    with torch.no_grad():
        g_fd = _fd_grad(lambda w: _ce(w, w2, x, y), w1)
    want = _hand_discrepancy(g_fd, expected.numpy(), "cosine")
    assert terms[3].item() == pytest.approx(want, rel=1e-6)


def test_nan_batch_with_a_decoder_reference_keeps_the_average_and_the_model_finite() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 6 * 6, 3))  # fmt: skip
    dec = ReferenceDecoder.for_layer(model[0])
    ggr = GenerativeGradientLoss(model[0].weight, dec, ema=0.9)
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 0])
    ggr(F.cross_entropy(model(x), y), x)
    average = ggr.reference_ema.clone()
    bad = x.clone()
    bad[1] = math.nan
    term, caught = _call_recording_warnings(ggr, F.cross_entropy(model(bad), y), bad)
    assert term.item() == 0.0 and [w.category for w in caught] == [RuntimeWarning]
    assert torch.equal(ggr.reference_ema, average)
    term = ggr(F.cross_entropy(model(x), y), x)
    assert torch.isfinite(term) and term.item() > 0
    torch.testing.assert_close(ggr.reference_ema, 0.9 * average + 0.1 * dec.gradient(x))


def test_non_finite_task_gradient_with_a_finite_reference_warns_and_gives_zero() -> None:
    w1, w2, x, y = _tiny(8)
    ggr = GenerativeGradientLoss(w1, torch.ones(w1.shape, dtype=torch.float64), ema=0.5)
    huge = w2.detach().clone().fill_(1e308).requires_grad_()  # logits overflow: inf gradient
    term, caught = _call_recording_warnings(ggr, _ce(w1, huge, x, y), x)
    assert term.item() == 0.0
    assert [w.category for w in caught] == [RuntimeWarning]
    assert "gradient of `task_loss`" in str(caught[0].message)
    assert (ggr.num_steps, ggr.num_ema_updates, ggr.reference_ema) == (1, 0, None)


# ------------------------------------------------------------------------------------------
# Mixed precision


def _amp_net() -> nn.Sequential:
    torch.manual_seed(13)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.GELU(), nn.Flatten(),
        nn.Linear(4 * 8 * 8, 3),
    )  # fmt: skip


def _amp_term(net, ref, dtype=None, scaler=None, scale=1.0, kind="cosine", every=1) -> float:
    """The term of one call, the forward pass under CPU autocast in ``dtype`` (None: fp32)."""
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(14))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    ggr = GenerativeGradientLoss(net[0].weight, ref, weight=1.0, discrepancy=kind, every=every)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        loss = scale * F.cross_entropy(net(x), y)
        term = ggr(loss, x, scaler=scaler)
    assert term.dtype == torch.float32 and torch.isfinite(term)
    return term.item()


@pytest.mark.parametrize("kind", ["cosine", "l2"])
def test_bfloat16_autocast_term_is_finite_and_close_to_float32(kind: str) -> None:
    net = _amp_net()
    ref = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(15))
    want = _amp_term(net, ref, kind=kind)
    got = _amp_term(net, ref, torch.bfloat16, kind=kind)
    assert got == pytest.approx(want, rel=2e-2)
    decoder = ReferenceDecoder.for_layer(net[0])  # the decoder's gradient under autocast too
    assert _amp_term(net, decoder, torch.bfloat16) == pytest.approx(
        _amp_term(net, decoder), rel=2e-2
    )


def test_grad_scaler_term_equals_the_unscaled_float32_term() -> None:
    net = _amp_net()
    ref = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(16))
    for kind in ("cosine", "l2", "l1"):
        want = _amp_term(net, ref, kind=kind)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
        assert _amp_term(net, ref, scaler=scaler, kind=kind) == pytest.approx(want, rel=1e-5)
        disabled = torch.amp.GradScaler("cpu", enabled=False)
        assert _amp_term(net, ref, scaler=disabled, kind=kind) == pytest.approx(want, rel=1e-6)


def test_float16_autocast_needs_the_scaler_for_small_gradients() -> None:
    """PyTorch's AMP recipe: without the scaler the float16 gradient underflows to zero."""
    net = _amp_net()
    ref = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(17))
    want = _amp_term(net, ref, scale=1e-6)  # float32: the cosine ignores the loss's scale
    scaler = torch.amp.GradScaler("cpu")  # init_scale 2**16
    assert _amp_term(net, ref, torch.float16, scaler, scale=1e-6) == pytest.approx(want, rel=1e-2)
    assert _amp_term(net, ref, torch.float16, scale=1e-6) == pytest.approx(1.0)  # g_cls == 0


def test_grad_scaler_overflow_step_returns_zero_silently_and_the_scaler_skips_it() -> None:
    net = _amp_net()
    decoder = ReferenceDecoder.for_layer(net[0])
    ggr = GenerativeGradientLoss(net[0].weight, decoder, ema=0.5)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # float16 gradients overflow

    def step() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(net(x), y)
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # the overflow step is silent
                term = ggr(loss, x, scaler=scaler)
        opt.zero_grad()
        scaler.scale(loss + term).backward()
        scaler.step(opt)
        scaler.update()
        return term

    before = [p.detach().clone() for p in net.parameters()]
    term = step()
    assert term.item() == 0.0 and term.grad_fn is None
    assert (ggr.num_steps, ggr.num_ema_updates, ggr.reference_ema) == (1, 0, None)
    assert scaler.get_scale() < 2.0**24  # the scaler saw the overflow and backed off
    for p, b in zip(net.parameters(), before, strict=True):
        assert torch.equal(p.detach(), b)  # skipped optimizer step
    applied = 0
    for _ in range(20):  # the scaler backs off until the steps are finite, then they apply
        applied += step().item() > 0
        assert ggr.num_ema_updates == applied  # no update on a zero (overflow) step
        moved = [not torch.equal(p, b) for p, b in zip(net.parameters(), before, strict=True)]
        if any(moved):
            break
    else:
        pytest.fail("the scaler never stepped")
    assert applied >= 1
    assert all(torch.isfinite(p).all() for p in net.parameters())


# ------------------------------------------------------------------------------------------
# ReferenceDecoder and filter stats


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "size"),
    [(3, 1, 1, 12), (7, 2, 3, 33), (4, 2, 1, 16), (5, 3, 0, 20)],
)
def test_decoder_last_layer_mirrors_conv_and_reconstructs_input_shape(
    kernel: int, stride: int, padding: int, size: int
) -> None:
    conv = nn.Conv2d(3, 6, kernel, stride, padding, bias=False)
    dec = ReferenceDecoder.for_layer(conv, hidden=4)
    assert isinstance(dec.out, nn.ConvTranspose2d)
    assert dec.out.weight.shape == conv.weight.shape
    assert dec.out.kernel_size == conv.kernel_size
    assert dec.out.stride == conv.stride
    assert dec.out.padding == conv.padding
    x = torch.randn(2, 3, size, size + 1)
    assert dec(x).shape == x.shape
    assert dec.gradient(x).shape == conv.weight.shape


@pytest.mark.parametrize("loss", ["mse", "l1"])
def test_decoder_gradient_matches_finite_differences_and_leaves_grads_alone(loss: str) -> None:
    conv = nn.Conv2d(1, 2, 3, padding=1)
    dec = ReferenceDecoder.for_layer(conv, hidden=3, loss=loss, dtype=torch.float64)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    g = dec.gradient(x)
    assert all(p.grad is None for p in dec.parameters())
    weight = dec.out.weight

    def rec_loss(w: torch.Tensor) -> torch.Tensor:
        h = dec.decoder(dec.encoder(x))
        out = F.conv_transpose2d(h, w, dec.out.bias, padding=1)
        return ((out - x) ** 2).mean() if loss == "mse" else (out - x).abs().mean()

    with torch.no_grad():
        expected = _fd_grad(rec_loss, weight)
    np.testing.assert_allclose(g.numpy(), expected, rtol=1e-5, atol=1e-9)


def test_decoder_fit_reduces_reconstruction_loss_without_tqdm(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` now raises ImportError
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    dec = ReferenceDecoder.for_layer(nn.Conv2d(1, 4, 3, padding=1))
    data = [(torch.rand(16, 1, 10, 10), torch.zeros(16)) for _ in range(4)]
    with torch.no_grad():
        before = float(dec.reconstruction_loss(torch.cat([d[0] for d in data])))
    losses = dec.fit(data, epochs=4, lr=1e-2, progress=True)
    with torch.no_grad():
        after = float(dec.reconstruction_loss(torch.cat([d[0] for d in data])))
    assert len(losses) == 4
    assert all(isinstance(v, float) for v in losses)
    assert after < 0.75 * before
    assert losses[-1] < losses[0]


def test_decoder_bad_arguments() -> None:
    dec = ReferenceDecoder.for_layer(nn.Conv2d(1, 4, 3))
    with pytest.raises(ValueError, match="no batches"):
        dec.fit([], epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        dec.fit([torch.randn(2, 1, 8, 8)], epochs=0)
    with pytest.raises(ValueError, match=r"`loader` must yield .*\(N, 1, H, W\), got shape"):
        dec.fit([torch.randn(2, 8, 8)], epochs=1)
    with pytest.raises(TypeError, match="Conv2d"):
        ReferenceDecoder.for_layer(nn.Linear(3, 3))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="groups"):
        ReferenceDecoder.for_layer(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="loss"):
        ReferenceDecoder.for_layer(nn.Conv2d(1, 4, 3), loss="bce")


def _decoder_and_batches(n: int = 3) -> tuple[ReferenceDecoder, list[torch.Tensor]]:
    torch.manual_seed(21)
    dec = ReferenceDecoder.for_layer(nn.Conv2d(1, 3, 3, padding=1), hidden=3)
    g = torch.Generator().manual_seed(22)
    return dec, [torch.rand(4, 1, 6, 6, generator=g) for _ in range(n)]


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_decoder_fit_with_batch_fn_on_dicts_equals_the_tuple_loader() -> None:
    dec, xs = _decoder_and_batches()
    start = _weights(dec)
    tuples = [(x, torch.zeros(4)) for x in xs]
    want = dec.fit(tuples, epochs=2, lr=1e-2)
    after_tuples = _weights(dec)
    for batch_fn, loader in [
        (lambda b: b["pixel_values"], [{"pixel_values": x, "labels": 0} for x in xs]),
        (lambda b: (b.x, b.y), [type("Batch", (), {"x": x, "y": 0})() for x in xs]),  # a pair
    ]:
        dec.load_state_dict(start)
        assert dec.fit(loader, epochs=2, lr=1e-2, batch_fn=batch_fn) == want
        _assert_same_weights(_weights(dec), after_tuples)


def test_decoder_fit_skips_a_nan_batch_like_a_fit_without_it() -> None:
    """Reference: the same fit over the loader without the NaN batch (Adam's step count too)."""
    dec, xs = _decoder_and_batches()
    start = _weights(dec)
    want = dec.fit(xs, epochs=2, lr=1e-2)
    after_clean = _weights(dec)
    dec.load_state_dict(start)
    nan = torch.full_like(xs[0], math.nan)
    with pytest.warns(RuntimeWarning, match="non-finite reconstruction loss"):
        got = dec.fit([xs[0], nan, xs[1], xs[2]], epochs=2, lr=1e-2)
    assert got == want
    _assert_same_weights(_weights(dec), after_clean)
    assert all(torch.isfinite(p).all() for p in dec.parameters())


def test_decoder_fit_errors_put_the_decoder_and_optimizer_back() -> None:
    dec, xs = _decoder_and_batches()
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    dec.fit(xs[:1], optimizer=opt)  # the optimizer has state now
    start, opt_state = _weights(dec), copy.deepcopy(opt.state_dict())
    grads = [p.grad.clone() for p in dec.parameters()]

    class OncePerLife:
        """Re-iterable, but empty on its second pass."""

        def __init__(self) -> None:
            self.used = False

        def __iter__(self):
            batches = [] if self.used else xs
            self.used = True
            return iter(batches)

    bad_loaders = [
        ([xs[0], xs[1], torch.randn(4, 2, 6, 6)], 1, "`loader` must yield"),  # third batch
        ([xs[0], xs[1][:0]], 1, "at least one sample"),  # a zero-size batch
        ([xs[0], (xs[1], 0, 0)], 1, "`batch_fn=`"),  # a 3-tuple: the hint
        ([xs[0], {"x": xs[1]}], 1, "`batch_fn=`"),
        ([torch.full_like(xs[0], math.nan)], 1, "every batch of epoch 0"),
        (OncePerLife(), 2, "no batches in epoch 1"),
    ]
    for loader, epochs, message in bad_loaders:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            with pytest.raises((TypeError, ValueError), match=message):
                dec.fit(loader, epochs=epochs, optimizer=opt)
        _assert_same_weights(_weights(dec), start)
        assert all(torch.equal(p.grad, g) for p, g in zip(dec.parameters(), grads, strict=True))
        assert_same(snapshot(opt), ("optimizer", opt_state))
        assert dec.training


def test_decoder_fit_refuses_a_generator_for_several_epochs_before_training() -> None:
    dec, xs = _decoder_and_batches()
    start = _weights(dec)
    gen = (x for x in xs)
    with pytest.raises(ValueError, match="one-shot iterator"):
        dec.fit(gen, epochs=2)
    _assert_same_weights(_weights(dec), start)
    assert torch.equal(next(gen), xs[0])  # not consumed
    assert len(dec.fit(gen, epochs=1)) == 1  # one epoch is fine


def test_decoder_gradient_and_forward_check_their_batch() -> None:
    dec, xs = _decoder_and_batches()
    for bad, error, message in [
        (xs[0][:0], ValueError, "at least one sample"),
        (xs[0][0], ValueError, r"\(N, 1, H, W\), got shape \(1, 6, 6\)"),
        (xs[0].long(), TypeError, "dtype torch.int64"),
        (xs[0].tolist(), TypeError, "got list"),
    ]:
        with pytest.raises(error, match=message):
            dec.gradient(bad)
        with pytest.raises(error, match=message):
            dec(bad)


def test_first_layer_filter_stats_matches_numpy_and_finds_first_conv() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(0, 0), nn.Conv2d(3, 5, 3), nn.ReLU(), nn.Conv2d(5, 2, 1))
    stats = first_layer_filter_stats(model)
    w = model[1].weight.detach().numpy().reshape(5, -1)
    np.testing.assert_allclose(stats.variance.numpy(), w.var(axis=1), rtol=1e-5)
    np.testing.assert_allclose(stats.norm.numpy(), np.sqrt((w**2).sum(axis=1)), rtol=1e-5)
    assert stats.mean_variance == pytest.approx(float(w.var(axis=1).mean()), rel=1e-5)
    with pytest.raises(ValueError, match=r"no nn\.Conv2d"):
        first_layer_filter_stats(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="layer"):
        first_layer_filter_stats([1, 2])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes vs one process over the global batch


def _dist_model() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 6 * 6, 4)
    )


def _ddp_worker(rank: int, world: int, model_state, dec_state, x, y, fit_batches) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _dist_model()
    model.load_state_dict(model_state)
    dec = ReferenceDecoder.for_layer(model[0], hidden=3)
    dec.load_state_dict(dec_state)
    half = len(y) // world
    local = [b[rank * (len(b) // world) : (rank + 1) * (len(b) // world)] for b in fit_batches]
    losses = dec.fit(local, epochs=2, lr=1e-2)
    ddp = DDP(model)
    ggr = GenerativeGradientLoss(model[0].weight, dec, weight=0.7)
    xl, yl = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    loss = F.cross_entropy(ddp(xl), yl)
    term = ggr(loss, xl)
    (loss + term).backward()
    return {
        "term": term.detach(),
        "ref": ggr.last_reference,
        "grads": [p.grad.clone() for p in model.parameters()],
        "dec": {k: v.clone() for k, v in dec.state_dict().items()},
        "losses": losses,
    }


@pytest.mark.distributed
def test_ddp_term_reference_and_grads_equal_single_process_over_global_batch() -> None:
    torch.manual_seed(0)
    model = _dist_model()
    dec = ReferenceDecoder.for_layer(model[0], hidden=3)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    dec_state = {k: v.clone() for k, v in dec.state_dict().items()}
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))
    fit_batches = [torch.rand(8, 1, 6, 6) for _ in range(3)]

    results = run_distributed(_ddp_worker, model_state, dec_state, x, y, fit_batches)

    dec.fit(fit_batches, epochs=2, lr=1e-2)
    ggr = GenerativeGradientLoss(model[0].weight, dec, weight=0.7)
    loss = F.cross_entropy(model(x), y)
    term = ggr(loss, x)
    (loss + term).backward()
    for r in results:
        for k, v in dec.state_dict().items():
            torch.testing.assert_close(r["dec"][k], v, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(r["ref"], ggr.last_reference, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(r["term"], term.detach(), rtol=1e-5, atol=1e-6)
        for g, p in zip(r["grads"], model.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[0]["term"], results[1]["term"], rtol=0, atol=0)
    assert term.item() > 0.05  # a non-trivial term


def _ddp_nan_worker(rank: int, world: int, model_state, dec_state, x, y, fit_batches) -> dict:
    """Rank 1 meets a NaN batch in ``fit`` (batch 1) and in the second GGR call."""
    model = _dist_model()
    model.load_state_dict(model_state)
    dec = ReferenceDecoder.for_layer(model[0], hidden=3)
    dec.load_state_dict(dec_state)
    half = len(y) // world
    local = [b[rank * half : (rank + 1) * half].clone() for b in fit_batches]
    xl, yl = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
    bad = xl.clone()
    if rank == 1:
        local[1][0] = math.nan
        bad[0] = math.nan
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dec.fit(local, epochs=1, lr=1e-2)
        ggr = GenerativeGradientLoss(model[0].weight, dec, ema=0.5)
        terms = [ggr(F.cross_entropy(model(b), yl), b).detach() for b in (xl, bad)]
    return {
        "dec": {k: v.clone() for k, v in dec.state_dict().items()},
        "terms": terms,
        "average": ggr.reference_ema,
        "warnings": [str(w.message) for w in caught if w.category is RuntimeWarning],
    }


@pytest.mark.distributed
def test_ddp_a_nan_batch_on_one_rank_is_skipped_on_every_rank() -> None:
    """Reference: one process over the global batches without the NaN batch."""
    torch.manual_seed(0)
    model = _dist_model()
    dec = ReferenceDecoder.for_layer(model[0], hidden=3)
    model_state = {k: v.clone() for k, v in model.state_dict().items()}
    dec_state = {k: v.clone() for k, v in dec.state_dict().items()}
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 4, (8,))
    fit_batches = [torch.rand(8, 1, 6, 6) for _ in range(3)]

    results = run_distributed(_ddp_nan_worker, model_state, dec_state, x, y, fit_batches)

    dec.fit([fit_batches[0], fit_batches[2]], epochs=1, lr=1e-2)
    ggr = GenerativeGradientLoss(model[0].weight, dec, ema=0.5)
    ggr(F.cross_entropy(model(x), y), x)
    for r in results:
        for k, v in dec.state_dict().items():
            torch.testing.assert_close(r["dec"][k], v, rtol=1e-4, atol=1e-6)
        assert r["terms"][1].item() == 0.0 and r["terms"][0].item() > 0
        torch.testing.assert_close(r["average"], ggr.reference_ema, rtol=1e-4, atol=1e-7)
        assert len(r["warnings"]) == 2  # one for fit, one for the GGR call, on both ranks


def _ddp_batchnorm_worker(rank: int, world: int, state, x, y, ref) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = {}
    for fused in (False, True):
        net = _bn_net()
        net.load_state_dict(state)
        ddp = DDP(net)
        ggr = GenerativeGradientLoss(net[0].weight, ref, weight=3.0, fused_double_backward=fused)
        half = len(y) // world
        xl, yl = x[rank * half : (rank + 1) * half], y[rank * half : (rank + 1) * half]
        loss = F.cross_entropy(ddp(xl), yl)
        (loss + ggr(loss, xl)).backward()
        out[fused] = [p.grad.clone() for p in net.parameters()]
    return out


@pytest.mark.distributed
def test_fused_batchnorm_under_ddp_equals_pytorchs_formula_on_every_rank() -> None:
    net = _bn_net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    x = (3 * torch.randn(8, 2, 6, 6, generator=g) + 5).double()
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    ref = torch.randn(net[0].weight.shape, generator=g, dtype=torch.float64)
    results = run_distributed(_ddp_batchnorm_worker, state, x, y, ref)
    for r in results:
        for got, want in zip(r[True], r[False], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(results[0][True], results[1][True], strict=True):  # DDP-averaged
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


# ------------------------------------------------------------------------------------------
# torchvision / timm first layers


@pytest.mark.vision
@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_works_with_the_first_conv_of_torchvision_and_timm_resnets(library: str) -> None:
    if library == "torchvision":
        import torchvision

        model = torchvision.models.resnet18(num_classes=5)
    else:
        import timm

        model = timm.create_model("resnet18", pretrained=False, num_classes=5)
    conv = model.conv1
    assert first_layer_filter_stats(model).variance.shape == (conv.out_channels,)
    dec = ReferenceDecoder.for_layer(conv, hidden=8)
    x, y = torch.randn(2, 3, 37, 37), torch.tensor([1, 3])
    dec.fit([x], epochs=1)
    ggr = GenerativeGradientLoss(conv.weight, dec, weight=1.0)
    loss = F.cross_entropy(model(x), y)
    term = ggr(loss, x)
    assert 0 < term.item() < 2
    term.backward()
    fc = model.get_classifier() if library == "timm" else model.fc
    assert fc.weight.grad is not None
    assert fc.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.vision
def test_timm_vit_fused_attention_is_refused_and_works_with_set_fused_attn_false() -> None:
    import timm
    from timm.layers import set_fused_attn, use_fused_attn

    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 1])
    before = use_fused_attn()
    try:
        for fused in (True, False):
            set_fused_attn(fused)
            model = timm.create_model(
                "vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=2
            )
            w = model.patch_embed.proj.weight
            ggr = GenerativeGradientLoss(w, torch.randn_like(w))
            loss = F.cross_entropy(model(x), y)
            if fused:
                with pytest.raises(ValueError, match="set_fused_attn"):
                    ggr(loss, x)
            else:  # the fused GELU double backward (default) equals PyTorch's formula
                grads = {}
                for fused_db in (True, False):
                    model.zero_grad()
                    loss = F.cross_entropy(model(x), y)
                    ggr.fused_double_backward = fused_db
                    (loss + ggr(loss, x)).backward()
                    grads[fused_db] = [p.grad.clone() for p in model.parameters()]
                assert w.grad is not None and torch.isfinite(w.grad).all()
                for got, want in zip(grads[True], grads[False], strict=True):
                    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    finally:
        set_fused_attn(before)


# ------------------------------------------------------------------------------------------
# The example


@pytest.mark.slow
def test_example_smoke_run(tmp_path: Path) -> None:
    script = ROOT / "examples" / "ggr.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--no-progress", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TORCH_RECAL_COMPILE": "0"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "GGR" in proc.stdout
    assert (tmp_path / "ggr.png").exists()


def _sharded_worker(rank: int, world_size: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from torch_recal import CoherentStrongReg

    mesh = init_device_mesh("cpu", (world_size,))
    weight = nn.Parameter(distribute_tensor(torch.randn(4, 3, 3, 3), mesh, [Shard(0)]))
    other = nn.Parameter(distribute_tensor(torch.randn(4, 4), mesh, [Replicate()]))
    out: dict = {}
    try:
        GenerativeGradientLoss(weight, torch.zeros(4, 3, 3, 3))
    except TypeError as err:
        out["ggr"] = str(err)
    try:  # the coherent gate takes DTensors, but one layout per regulariser
        CoherentStrongReg([("conv.weight", weight), ("fc.weight", other)], strength=1e-3)
    except ValueError as err:
        out["coherent"] = str(err)
    return out


@pytest.mark.distributed
def test_sharded_target_is_refused_with_a_clear_error():
    # FSDP2 / tensor-parallel DTensor weight: the forward uses gathered copies, so the double
    # backward cannot reach it; GGR says so up front instead of failing later
    for out in run_distributed(_sharded_worker):
        assert "`target` is sharded (FSDP / DTensor)" in out["ggr"]
        assert (
            "`fc.weight` (" in out["coherent"] and "differs from `conv.weight`" in out["coherent"]
        )


def test_default_weight_is_the_one_the_docs_and_the_example_state() -> None:
    """The default `weight` (chosen in the reproduction suite's exploration) is stated the same
    in the docstring, the method card's tables and the example's command line."""
    import inspect
    import re

    default = inspect.signature(GenerativeGradientLoss).parameters["weight"].default
    doc = GenerativeGradientLoss.__doc__ or ""
    assert re.search(rf"\(default {default:g}\b", doc), "the docstring's `weight` default"
    card = (ROOT / "docs" / "methods" / "generative.md").read_text()
    assert f"| `weight` | `{default:g}` |" in card, "the card's options table"
    assert f"| weight {default:g} | INFERRED" in card, "the card's VERIFIED vs INFERRED table"
    example = (ROOT / "examples" / "ggr.py").read_text()
    assert re.search(rf'"--weight", type=float, default={default:g},', example), "examples/ggr.py"
