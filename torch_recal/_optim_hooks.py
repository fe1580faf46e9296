"""Running a piece around every optimizer step, through the optimizer's step hooks (private).

``before`` runs once the step's gradients exist and just before the update: in the
optimizer's step pre-hook, or, when ``optimizer.step(closure)`` is used (Lightning does), right
after the closure returns, since the closure computes the gradients inside ``step``. ``after``
runs in the step post-hook. A step that never reaches the optimizer (a ``GradScaler``'s
inf/NaN step) runs neither. Gradient clipping and ``scaler.unscale_`` before ``step`` are
seen by ``before``; fused and foreach optimizers call the same hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class Attachment:
    """A piece attached to an optimizer's step hooks; ``remove()`` (or leaving a ``with``
    block) detaches it. Removing twice is harmless."""

    def __init__(self, handles: list[Any], on_remove: Callable[[], None]) -> None:
        self._handles, self._on_remove = handles, on_remove

    @property
    def attached(self) -> bool:
        """Whether the hooks are still registered."""
        return bool(self._handles)

    def remove(self) -> None:
        """Detach (idempotent)."""
        if self._handles:
            for handle in self._handles:
                handle.remove()
            self._handles = []
            self._on_remove()

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def attach_to_optimizer(
    optimizer: torch.optim.Optimizer,
    before: Callable[[], None],
    after: Callable[[], None],
    on_remove: Callable[[], None],
) -> Attachment:
    """Register ``before``/``after`` around every ``optimizer.step`` (see the module
    docstring); ``on_remove`` runs when the returned handle is removed."""

    def pre_hook(opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        # args = (optimizer, *step's positional args): the closure is args[1] or a kwarg
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            before()
            return None

        def closure_then_before() -> Any:
            loss = closure()
            before()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": closure_then_before}
        return (args[0], closure_then_before, *args[2:]), kwargs

    def post_hook(opt: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        after()

    handles = [
        optimizer.register_step_pre_hook(pre_hook),
        optimizer.register_step_post_hook(post_hook),
    ]
    return Attachment(handles, on_remove)
