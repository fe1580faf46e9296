"""Double-backprop helpers for :class:`~torch_recal.GenerativeGradientLoss` (private).

**Fused double backwards for train-mode batch norm and GELU.** PyTorch differentiates batch
norm's backward (``native_batch_norm_backward``) and GELU's (``gelu_backward``) with eager
composites of elementwise and reduction ops (``batchnorm_double_backward``,
``gelu_double_backward``), one full-size temporary per op. In a GGR step of ResNet-20 on CPU,
batch norm's was the largest single cost (``python benchmarks/bench_ggr.py --profile``; the
figures are on the GGR method card, beside their commands).
:func:`fused_double_backward` is a context manager around the ``create_graph=True`` gradient
call. It puts a hook on every train-mode batch-norm node and every GELU node of the graph
below ``root``; when such a node runs with ``create_graph=True`` (and, for batch norm, produces
only the input gradient), the hook keeps the value PyTorch computed and gives it an autograd
node whose backward is the hand-derived formula of this module
(:func:`batch_norm_double_backward`: one reduction and one elementwise sweep;
:func:`gelu_double_backward`: one elementwise sweep), compiled under the library's policy
(:mod:`torch_recal._compile`; ``*_kernel`` are the compiled twins). The hooks are removed when
the block exits, also on error. Nodes it does not handle (eval-mode batch norm, a pass that
also asks for the batch norm's weight or bias gradients, cuDNN/MIOpen batch norm,
``SyncBatchNorm``) keep PyTorch's formula. Nothing about the user's model changes; the values
are PyTorch's to round-off (tested in float64 against PyTorch's own formulas and against
finite differences).

**An early, clear error** (:func:`raise_if_not_twice_differentiable`) when the gradient
made with ``create_graph=True`` holds an op that PyTorch cannot differentiate again (fused
scaled-dot-product attention kernels, ``once_differentiable`` Functions): without it the
user's ``(loss + term).backward()`` fails later with PyTorch's terse message.

The names in ``__all__`` are this module's internal seam: the tests (``tests/
test_generative.py``, ``tests/test_compile.py``) call the formulas and their compiled twins
directly; they are not part of the public API and may change without notice.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from torch_recal._compile import lazy_compile

__all__ = [
    "batch_norm_double_backward",
    "batch_norm_double_backward_kernel",
    "fused_double_backward",
    "gelu_double_backward",
    "gelu_double_backward_kernel",
    "raise_if_not_twice_differentiable",
]

# Autograd nodes of train-mode batch norm whose saved tensors are ``input``, ``weight``,
# ``result1`` (the batch mean) and ``result2`` (the batch's 1/sqrt(var + eps)) and whose
# first output is the input gradient. cuDNN's node saves the same names but is untested
# here (no GPU was available), so it keeps PyTorch's formula.
_BATCH_NORM_NODE = "NativeBatchNormBackward0"
# GELU's node saves ``self`` (the input) and ``approximate``; its only output is the input grad.
_GELU_NODE = "GeluBackward0"

# Nodes that raise when backpropagated through: an op without a derivative formula, and the
# outputs of a ``once_differentiable`` backward.
_NOT_DIFFERENTIABLE = frozenset(
    {"torch::autograd::NotImplemented", "torch::autograd::Error", "torch::autograd::DelayedError"}
)
# Fused attention kernels (their backward has no derivative): prefixes of their node names.
_FUSED_ATTENTION = (
    "ScaledDotProductFlashAttention",
    "ScaledDotProductEfficientAttention",
    "ScaledDotProductCudnnAttention",
    "ScaledDotProductFusedAttention",
)


# --- the hand-derived double backwards (eager formulas and their compiled twins)


def batch_norm_double_backward(
    a: Tensor, g: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Vector-Jacobian product of train-mode batch norm's input gradient, hand-derived.

    Per channel, over its ``m = N * prod(spatial)`` elements, with ``r = invstd``,
    ``xhat = (x - mean) r`` and ``P(v) = v - mean(v) - xhat mean(v xhat)`` (the projection
    that removes the span of ``1`` and ``xhat``), batch norm's input gradient is
    ``dx = weight r P(g)``. For a cotangent ``a`` of ``dx``, with ``q = <P(a), g>``:

    * ``d<a, dx>/dg = weight r P(a)``
    * ``d<a, dx>/dweight = r q``
    * ``d<a, dx>/dx = -(weight r^2 / m) (xhat q + <a, xhat> P(g) + <g, xhat> P(a))``

    (``mean`` and ``invstd`` are the batch's own, so their dependence on ``x`` is included).
    The same values as PyTorch's ``batchnorm_double_backward``, but one reduction sweep and
    one elementwise sweep when compiled; returned in the compute dtype (float32 or float64).
    """
    cdt = torch.promote_types(x.dtype, torch.float32)
    a, g, x = a.to(cdt), g.to(cdt), x.to(cdt)
    view = (1, -1) + (1,) * (x.ndim - 2)
    dims = [0, *range(2, x.ndim)]
    m = x.numel() // x.shape[1]
    r, w = invstd.to(cdt).view(view), weight.to(cdt).view(view)
    xc = x - mean.to(cdt).view(view)
    sum_a, sum_g = a.sum(dims, keepdim=True), g.sum(dims, keepdim=True)
    s_a = (a * xc).sum(dims, keepdim=True) * r  # <a, xhat>
    s_g = (g * xc).sum(dims, keepdim=True) * r  # <g, xhat>
    q = (a * g).sum(dims, keepdim=True) - (sum_a * sum_g + s_a * s_g) / m
    c = -w * r * r / m
    grad_x = (
        (c * (q - 2.0 * s_a * s_g / m) * r) * xc
        + (c * s_a) * g
        + (c * s_g) * a
        - c * (s_a * sum_g + s_g * sum_a) / m
    )
    grad_g = (w * r) * (a - sum_a / m - (s_a * r / m) * xc)
    return grad_g, grad_x, (r * q).reshape(-1)


batch_norm_double_backward_kernel = lazy_compile(batch_norm_double_backward)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_CUBIC = 0.044715


def gelu_double_backward(
    a: Tensor, g: Tensor, x: Tensor, approximate: str
) -> tuple[Tensor, Tensor]:
    """Vector-Jacobian product of GELU's input gradient ``dx = g * gelu'(x)``, hand-derived.

    For a cotangent ``a`` of ``dx``: ``d<a, dx>/dg = a gelu'(x)`` (PyTorch's own
    ``gelu_backward(a, x)``: ``dx`` is linear in ``g``) and ``d<a, dx>/dx = a g gelu''(x)``, with

    * ``approximate="none"``, ``gelu(x) = x Phi(x)``: ``gelu'' = phi(x) (2 - x^2)``
      (``Phi``, ``phi``: the standard normal cdf and pdf);
    * ``approximate="tanh"``, ``gelu(x) = x (1 + tanh u) / 2`` with
      ``u = sqrt(2/pi) (x + 0.044715 x^3)``:
      ``gelu'' = sech^2(u) (u' + x u'' / 2 - x tanh(u) u'^2)``.

    The same values as PyTorch's ``gelu_double_backward``, but one elementwise sweep when
    compiled; returned in the compute dtype (float32 or float64).
    """
    cdt = torch.promote_types(x.dtype, torch.float32)
    a, g, x = a.to(cdt), g.to(cdt), x.to(cdt)
    grad_g = torch.ops.aten.gelu_backward(a, x, approximate=approximate)
    x2 = x * x
    if approximate == "tanh":
        u = _SQRT_2_OVER_PI * x * (1.0 + _GELU_TANH_CUBIC * x2)
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * x2)
        d2u = (6.0 * _SQRT_2_OVER_PI * _GELU_TANH_CUBIC) * x
        sech2 = torch.cosh(u).reciprocal().square()  # not 1 - tanh^2: no cancellation
        second = sech2 * (du + 0.5 * x * d2u - x * torch.tanh(u) * du * du)
    else:
        second = (_INV_SQRT_2PI * (2.0 - x2)) * torch.exp(-0.5 * x2)
    return grad_g, a * g * second


gelu_double_backward_kernel = lazy_compile(gelu_double_backward)


# --- the autograd nodes that carry them


class _BatchNormInputGrad(torch.autograd.Function):
    """Identity on the value of batch norm's input gradient; backward: the fused formula."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        dx: Tensor,
        g: Tensor,
        x: Tensor,
        weight: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
    ) -> Tensor:
        ctx.save_for_backward(g, x, weight, mean, invstd)
        return dx

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, a: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, x, weight, mean, invstd = ctx.saved_tensors
        w = weight if weight is not None else torch.ones_like(invstd)
        grad_g, grad_x, grad_w = batch_norm_double_backward_kernel(a, g, x, mean, invstd, w)
        _, need_g, need_x, need_w, _, _ = ctx.needs_input_grad
        return (
            None,
            grad_g.to(g.dtype) if need_g else None,
            grad_x.to(x.dtype) if need_x else None,
            grad_w.to(w.dtype) if need_w and weight is not None else None,
            None,
            None,
        )


class _GeluInputGrad(torch.autograd.Function):
    """Identity on the value of GELU's input gradient; backward: the fused formula."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, dx: Tensor, g: Tensor, x: Tensor, approximate: str
    ) -> Tensor:
        ctx.save_for_backward(g, x)
        ctx.approximate = approximate
        return dx

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, a: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        g, x = ctx.saved_tensors
        grad_g, grad_x = gelu_double_backward_kernel(a, g, x, ctx.approximate)
        _, need_g, need_x, _ = ctx.needs_input_grad
        return (
            None,
            grad_g.to(g.dtype) if need_g else None,
            grad_x.to(x.dtype) if need_x else None,
            None,
        )


def _batch_norm_input_grad(node: Any, dx: Tensor, g: Tensor) -> Tensor:
    return _BatchNormInputGrad.apply(
        dx, g, node._saved_input, node._saved_weight, node._saved_result1, node._saved_result2
    )


def _gelu_input_grad(node: Any, dx: Tensor, g: Tensor) -> Tensor:
    return _GeluInputGrad.apply(dx, g, node._saved_self, node._saved_approximate)


_FusedInputGrad = Callable[[Any, Tensor, Tensor], Tensor]


def _hook(
    fused: _FusedInputGrad,
    node: Any,
    grad_inputs: tuple[Tensor | None, ...],
    grad_outputs: tuple[Tensor | None, ...],
) -> tuple[Tensor | None, ...] | None:
    """Swap the node's input gradient for one with the fused backward, in a
    ``create_graph=True`` pass that asks only for the input gradient (else PyTorch's)."""
    dx, g = grad_inputs[0], grad_outputs[0]
    if dx is None or g is None or dx.grad_fn is None or any(t is not None for t in grad_inputs[1:]):
        return None
    return (fused(node, dx.detach(), g), *grad_inputs[1:])


def _graph_nodes(root: Any) -> Iterator[Any]:
    """Every autograd node reachable from ``root`` (each once)."""
    seen = {root}
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)


def _fused_for(node: Any) -> _FusedInputGrad | None:
    """The fused input gradient for ``node``, or ``None`` to keep PyTorch's formula."""
    name = node.name()
    if name == _BATCH_NORM_NODE and node._saved_training:
        return _batch_norm_input_grad
    if name == _GELU_NODE:
        return _gelu_input_grad
    return None


@contextlib.contextmanager
def fused_double_backward(root: Tensor) -> Iterator[int]:
    """Within the block, train-mode batch norms and GELUs under ``root`` use the fused double
    backward. Yields the number of nodes hooked (internal; see the module docstring).
    """
    handles = []
    try:
        if root.grad_fn is not None:
            for node in _graph_nodes(root.grad_fn):
                fused = _fused_for(node)
                if fused is not None:
                    handles.append(node.register_hook(functools.partial(_hook, fused, node)))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def raise_if_not_twice_differentiable(grad: Tensor, who: str) -> None:
    """Raise ``ValueError`` if backpropagating through ``grad`` (a gradient computed with
    ``create_graph=True``) would reach an op whose double backward PyTorch lacks."""
    if grad.grad_fn is None:
        return
    names = {node.name() for node in _graph_nodes(grad.grad_fn)}
    if names.isdisjoint(_NOT_DIFFERENTIABLE):
        return
    attention = sorted(name for name in names if name.startswith(_FUSED_ATTENTION))
    if attention:
        fix = (
            f"it uses fused scaled-dot-product attention ({', '.join(attention)}), which has "
            "no double backward: run the forward pass under `with torch.nn.attention."
            "sdpa_kernel(torch.nn.attention.SDPBackend.MATH):` (timm: "
            "`timm.layers.set_fused_attn(False)`)"
        )
    else:
        fix = (
            "replace that op (a fused kernel or a `once_differentiable` autograd Function) by "
            "one that supports double backward"
        )
    raise ValueError(
        f"{who}: `task_loss` cannot be differentiated twice, as the term needs: its graph "
        f"holds an op whose double backward PyTorch does not implement; {fix}"
    )
