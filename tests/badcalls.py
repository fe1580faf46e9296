"""Harness for the bad-call tables (docs/conventions.md, rules 1 and 4).

Each table row is a :class:`Bad`: an entry point, a fresh context, the bad call, the exception
it must raise, and the argument its message must name. The runner asserts all three, and that
the context's state (an object's ``state_dict()``, a model's parameters and buffers, an
optimizer's state) is exactly what it was before the call: nothing half-changed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn


@dataclass
class Bad:
    """One bad call.

    Args:
        entry: the public name it exercises (``"CoherentStrongReg"``,
            ``"CoherentStrongReg.load_state_dict"``, ``"functional.soft_threshold_"``): the
            coverage test checks that every public callable has at least one row.
        call: ``call(ctx)`` makes the bad call (``ctx`` is what ``make`` returned).
        error: the exception type it must raise.
        names: a text the message must contain, normally the argument's name in backquotes.
        make: builds a fresh context (an object, a model, a tuple of them); ``None``: no context.
        id: a short test id (default: ``entry`` and ``names``).
    """

    entry: str
    call: Callable[[Any], Any]
    error: type[BaseException]
    names: str
    make: Callable[[], Any] | None = None
    id: str = ""
    marks: Sequence[Any] = field(default_factory=tuple)

    def param(self) -> Any:
        return pytest.param(self, id=self.id or f"{self.entry}-{self.names.strip('`')}",
                            marks=tuple(self.marks))  # fmt: skip


def snapshot(ctx: Any) -> Any:
    """A deep copy of everything observable in ``ctx``: tensors (values, dtype, shape,
    requires_grad, .grad), modules (state_dict, requires_grad, training, child names),
    optimizers (state_dict), objects with ``state_dict()`` (their state and, for the library's
    pieces, their public attributes), and containers of these."""
    if isinstance(ctx, Tensor):
        return ("tensor", ctx.detach().clone(), ctx.requires_grad,
                None if ctx.grad is None else ctx.grad.detach().clone())  # fmt: skip
    if isinstance(ctx, nn.Module):
        return (
            "module",
            {k: v.detach().clone() for k, v in ctx.state_dict().items()},
            [
                (n, p.requires_grad, None if p.grad is None else p.grad.clone())
                for n, p in ctx.named_parameters()
            ],
            [(n, type(m).__name__, m.training) for n, m in ctx.named_modules()],
        )
    if isinstance(ctx, torch.optim.Optimizer):
        return ("optimizer", copy.deepcopy(ctx.state_dict()))
    if isinstance(ctx, Mapping):
        return {k: snapshot(v) for k, v in ctx.items()}
    if isinstance(ctx, (list, tuple)):
        return [snapshot(v) for v in ctx]
    if hasattr(ctx, "state_dict") and callable(ctx.state_dict):
        public = {k: v for k, v in vars(ctx).items() if not k.startswith("_")
                  and isinstance(v, (int, float, bool, str, type(None)))}  # fmt: skip
        return ("stateful", copy.deepcopy(ctx.state_dict()), public)
    return ("other", repr(type(ctx)))


def assert_same(a: Any, b: Any, where: str = "ctx") -> None:
    """Exact equality of two :func:`snapshot` results (NaN equals NaN)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), where
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b) or torch.allclose(a, b, rtol=0, atol=0, equal_nan=True), where
        return
    if isinstance(a, Mapping):
        assert isinstance(b, Mapping) and set(a) == set(b), f"{where}: keys {set(a) ^ set(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}[{k!r}]")
        return
    if isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
        return
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    assert a == b, f"{where}: {a!r} != {b!r}"


def run_bad_call(case: Bad) -> None:
    """The row's call raises ``case.error`` naming ``case.names``, and changes nothing."""
    ctx = case.make() if case.make is not None else None
    before = snapshot(ctx)
    with pytest.raises(case.error) as info:
        case.call(ctx)
    assert type(info.value) is case.error or isinstance(info.value, case.error)
    message = str(info.value)
    assert case.names in message, f"message does not name {case.names!r}: {message!r}"
    assert_same(before, snapshot(ctx))
