"""A fused double backward for train-mode batch norm during a ``create_graph=True`` pass.

PyTorch differentiates batch norm's backward (``native_batch_norm_backward``) with a
composite of about forty eager ops (``batchnorm_double_backward``). In a double-backprop
step of a batch-norm network, such as a :class:`~torch_recal.GenerativeGradientLoss` step,
that formula is the largest single cost on CPU (``python benchmarks/bench_ggr.py --profile``).

:func:`fused_batchnorm_double_backward` is a context manager around the ``create_graph=True``
gradient call. It puts a hook on every train-mode batch-norm node of the graph below
``root``; when such a node runs with ``create_graph=True`` and produces only the input
gradient, the hook keeps the value PyTorch computed and gives it an autograd node whose
backward is :func:`torch_recal.functional._batch_norm_double_backward`: the same math in
one reduction and one elementwise sweep, compiled under the library's policy
(:mod:`torch_recal._compile`). The hooks are removed when the block exits, also on error.
Nodes it does not handle (eval-mode batch norm, a pass that also asks for the batch norm's
weight or bias gradients, cuDNN/MIOpen batch norm, ``SyncBatchNorm``) keep PyTorch's formula.

Nothing about the user's model changes; the values are PyTorch's to round-off (tested in
float64 against PyTorch's own formula and against finite differences).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from torch_recal.functional import _batch_norm_double_backward_kernel

__all__ = ["fused_batchnorm_double_backward"]

# Autograd nodes of train-mode batch norm whose saved tensors are ``input``, ``weight``,
# ``result1`` (the batch mean) and ``result2`` (the batch's 1/sqrt(var + eps)) and whose
# first output is the input gradient. cuDNN's node saves the same names but is untested
# here (no GPU was available), so it keeps PyTorch's formula.
_NODE_NAMES = frozenset({"NativeBatchNormBackward0"})


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
        grad_g, grad_x, grad_w = _batch_norm_double_backward_kernel(a, g, x, mean, invstd, w)
        _, need_g, need_x, need_w, _, _ = ctx.needs_input_grad
        return (
            None,
            grad_g.to(g.dtype) if need_g else None,
            grad_x.to(x.dtype) if need_x else None,
            grad_w.to(w.dtype) if need_w and weight is not None else None,
            None,
            None,
        )


def _hook(
    node: Any, grad_inputs: tuple[Tensor | None, ...], grad_outputs: tuple[Tensor | None, ...]
) -> tuple[Tensor | None, ...] | None:
    dx = grad_inputs[0]
    g = grad_outputs[0]
    if dx is None or g is None or dx.grad_fn is None or any(t is not None for t in grad_inputs[1:]):
        return None  # not a create_graph pass, or weight/bias gradients wanted: PyTorch's formula
    fused = _BatchNormInputGrad.apply(
        dx.detach(),
        g,
        node._saved_input,
        node._saved_weight,
        node._saved_result1,
        node._saved_result2,
    )
    return (fused, *grad_inputs[1:])


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


@contextlib.contextmanager
def fused_batchnorm_double_backward(root: Tensor) -> Iterator[int]:
    """Within the block, train-mode batch norms under ``root`` use the fused double backward.

    Yields the number of batch-norm nodes hooked (internal; see the module docstring).
    """
    handles = []
    try:
        if root.grad_fn is not None:
            for node in _graph_nodes(root.grad_fn):
                if node.name() in _NODE_NAMES and node._saved_training:
                    handles.append(node.register_hook(functools.partial(_hook, node)))
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
