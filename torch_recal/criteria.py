"""When, and how strongly, :class:`~torch_recal.CoherentStrongReg` regularises: its criteria.

:class:`~torch_recal.CoherentStrongReg` separates *what* is applied (``kind``, ``l1_mode``,
``group``, which tensors) from *when and how strongly* (this module), the way
``torch.ao.pruning`` separates a sparsifier from its sparsity scheduler. A criterion is a
small frozen configuration object passed as ``criterion=``; the strings ``"descent"``,
``"ratio"``, ``"always"`` stand for the defaults of the first three. Schedule pieces that
apply to every criterion (``warmup``, ``delay``, ``freeze_below``, ``total_steps``) stay
arguments of the regulariser.

Without ``criterion=`` the strength-driven form (``strength=``) uses :class:`Always`: the
simple schedule warm-up -> proximal L1 -> freeze. The descent gate is
``criterion=DescentGate()`` (or ``"descent"``); the gate's options given as keyword
arguments without a criterion (``max_undo=``, ``resume_undo=``, ``smoothing=``, the form
before the criteria became objects) still select :class:`DescentGate` with those options.

Paper: Park et al., "Gradient-Coherent Strong Regularization for Deep Neural Networks",
https://arxiv.org/abs/1811.08056 (the criteria themselves are this library's, chosen by
measurement; see ``docs/methods/coherent.md``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, ClassVar, Literal

from torch_recal._checks import (
    check_choice,
    check_flag,
    check_int,
    check_optional_int,
    check_optional_real,
    check_real,
)

__all__ = ["Always", "Budget", "Criterion", "DescentGate", "RatioRule", "resolve_criterion"]

Progress = Literal["next-batch", "same-batch"]
Allocation = Literal["auto", "global", "layer"]


@dataclass(frozen=True)
class DescentGate:
    """On while the regulariser undoes at most ``max_undo`` of the optimizer's first-order
    progress on the loss (both smoothed), off above it, on again below ``resume_undo``.

    ``progress="next-batch"`` (default) measures the optimizer's progress over a step with the
    gradient of the *next* mini-batch, at the end point of the step (one step later), which
    is unbiased; ``"same-batch"`` uses the gradient that made the step, which overstates the
    progress by the step's own noise (about 3.5x at batch 32 in a measurement; see the card).
    The next-batch estimate keeps one copy of the regularised weights between steps (in the
    optimizer's state when there is an optimizer, so that a checkpoint of the optimizer
    resumes it exactly).

    Paper: Park et al., https://arxiv.org/abs/1811.08056 (the rule is this library's).

    Args:
        max_undo: switch off above this undone fraction (> 0).
        resume_undo: switch back on below it (``0 < resume_undo <= max_undo``).
        smoothing: EMA factor of the progress and the cost, in ``[0, 1)``.
        progress: ``"next-batch"`` or ``"same-batch"``.

    Example:
        >>> from torch_recal import DescentGate
        >>> DescentGate(max_undo=0.4)
        DescentGate(max_undo=0.4, resume_undo=0.25, smoothing=0.9, progress='next-batch')
    """

    max_undo: float = 0.5
    resume_undo: float = 0.25
    smoothing: float = 0.9
    progress: Progress = "next-batch"
    name: ClassVar[str] = "descent"

    def __post_init__(self) -> None:
        who = "DescentGate"
        _set(self, "max_undo", check_real(self.max_undo, "max_undo", who=who, minimum=0,
                                          open_low=True))  # fmt: skip
        _set(self, "resume_undo", check_real(self.resume_undo, "resume_undo", who=who, minimum=0,
                                             maximum=self.max_undo, open_low=True))  # fmt: skip
        _set(self, "smoothing", check_real(self.smoothing, "smoothing", who=who, minimum=0,
                                           maximum=1, open_high=True))  # fmt: skip
        _set(self, "progress", check_choice(self.progress, "progress",
                                            ("next-batch", "same-batch"), who=who))  # fmt: skip


@dataclass(frozen=True)
class RatioRule:
    """The library's first default, kept by name: off after ``window`` steps in a row with
    ``|r| / |g| > max_ratio`` or ``cos(g, r) < min_cosine`` (``|r| = strength sqrt(n)`` for
    L1), on again after ``window`` coherent steps when ``reactivate``. It measured poorly (an
    absolute threshold on the loss-gradient norm); see the card.

    Paper: Park et al., https://arxiv.org/abs/1811.08056 (the rule is this library's).

    Args:
        max_ratio: incoherent when ``|r| / |g| > max_ratio`` (``None``: unused).
        min_cosine: incoherent when ``cos(g, r) < min_cosine`` (``None``: unused).
        window: consecutive incoherent (coherent) steps to switch off (on), >= 1.
        reactivate: switch back on after ``window`` coherent steps.

    Example:
        >>> from torch_recal import RatioRule
        >>> RatioRule(window=3).window
        3
    """

    max_ratio: float | None = 4.0
    min_cosine: float | None = None
    window: int = 2
    reactivate: bool = True
    name: ClassVar[str] = "ratio"

    def __post_init__(self) -> None:
        who = "RatioRule"
        _set(self, "max_ratio", check_optional_real(self.max_ratio, "max_ratio", who=who,
                                                    minimum=0, open_low=True))  # fmt: skip
        _set(self, "min_cosine", check_optional_real(self.min_cosine, "min_cosine", who=who,
                                                     minimum=-1, maximum=1))  # fmt: skip
        _set(self, "window", check_int(self.window, "window", who=who, minimum=1))
        _set(self, "reactivate", check_flag(self.reactivate, "reactivate", who=who))


@dataclass(frozen=True)
class Always:
    """On at every step (after ``delay`` and the warm-up, until the freeze): plain strong L1,
    or, with ``delay=``, Delayed Strong Regularization (Park et al.'s earlier method,
    https://openreview.net/forum?id=Bys_NzbC-). The default criterion of the strength-driven
    form (``strength=`` without ``criterion=``): warm-up -> proximal L1 -> freeze.

    Example:
        >>> from torch_recal import Always
        >>> Always()
        Always()
    """

    name: ClassVar[str] = "always"


@dataclass(frozen=True)
class Budget:
    """Reach a share of exact zeros (``target_sparsity``) in the regularised weights by the
    end of training, then keep that zero pattern: the strength need not be searched.

    The sparsity asked for follows the cubic ramp of gradual magnitude pruning,
    ``s(p) = target (1 - (1 - p)^3)``, over the schedule's progress ``p``: the step over
    ``end * total_steps`` when ``total_steps`` is given (needed with a constant learning
    rate), else the decay of the learning rate, which reaches ``p = 1`` exactly at the
    freeze (``freeze_below`` of the peak). Every ``every`` steps the weights (or units, with
    ``group="unit"``) whose magnitude is at or below the ``s(p)``-quantile are marked
    (``allocation``: one threshold over all tensors, or the same share in every tensor);
    ``method="shrink"`` moves the marked weights towards zero by a proximal L1 step of
    ``rate`` times the threshold at every step (the other weights are not shrunk, and a
    marked weight whose gradient pulls it back above the threshold survives);
    ``method="magnitude"`` sets them to zero and keeps them there (gradual magnitude pruning).
    At ``p = 1`` the smallest weights are zeroed until exactly the target share is zero, and
    the zero pattern is frozen.

    Paper: Park et al., https://arxiv.org/abs/1811.08056 (the budget is this library's;
    its ramp is the one of Zhu & Gupta, https://arxiv.org/abs/1710.01878).

    Args:
        target_sparsity: the share of exact zeros to reach, in ``(0, 1)``.
        total_steps: the number of optimizer steps of the run (``None``: the end is read off
            the learning rate's decay).
        allocation: ``"global"`` (one threshold over all regularised tensors), ``"layer"``
            (the same sparsity in every tensor), or ``"auto"``: global for single weights,
            per layer for units (``group="unit"``: a global threshold on unit norms would
            empty the layers whose units are many small weights first).
        end: with ``total_steps``, the fraction of the run at which the target is reached and
            the pattern frozen, in ``(0, 1]``.
        method: ``"shrink"`` or ``"magnitude"`` (see above).
        rate: ``method="shrink"``: the proximal step on the marked weights, as a fraction of
            the threshold, in ``(0, 1]``.
        every: steps between two updates of the threshold (>= 1).

    Example:
        >>> from torch_recal import Budget
        >>> Budget(0.9, total_steps=1000).target_sparsity
        0.9
    """

    target_sparsity: float
    total_steps: int | None = None
    allocation: Allocation = "auto"
    end: float = 0.8
    method: Literal["shrink", "magnitude"] = "shrink"
    rate: float = 0.1
    every: int = 16
    name: ClassVar[str] = "budget"

    def __post_init__(self) -> None:
        who = "Budget"
        _set(self, "target_sparsity", check_real(self.target_sparsity, "target_sparsity",
                                                 who=who, minimum=0, maximum=1, open_low=True,
                                                 open_high=True))  # fmt: skip
        _set(self, "total_steps", check_optional_int(self.total_steps, "total_steps", who=who,
                                                     minimum=1))  # fmt: skip
        _set(self, "allocation", check_choice(self.allocation, "allocation",
                                              ("auto", "global", "layer"), who=who))  # fmt: skip
        _set(self, "end", check_real(self.end, "end", who=who, minimum=0, maximum=1,
                                     open_low=True))  # fmt: skip
        _set(self, "method", check_choice(self.method, "method", ("shrink", "magnitude"),
                                          who=who))  # fmt: skip
        _set(self, "rate", check_real(self.rate, "rate", who=who, minimum=0, maximum=1,
                                      open_low=True))  # fmt: skip
        _set(self, "every", check_int(self.every, "every", who=who, minimum=1))


Criterion = DescentGate | RatioRule | Always | Budget
_BY_NAME: dict[str, type] = {"descent": DescentGate, "ratio": RatioRule, "always": Always}
_LEGACY = {  # the options the constructor took before the criteria became objects
    "max_undo": DescentGate,
    "resume_undo": DescentGate,
    "smoothing": DescentGate,
    "max_ratio": RatioRule,
    "min_cosine": RatioRule,
    "window": RatioRule,
    "reactivate": RatioRule,
}


def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def legacy_options() -> tuple[str, ...]:
    """The criterion options :class:`~torch_recal.CoherentStrongReg` still accepts as keyword
    arguments (the form before the criteria became objects)."""
    return tuple(_LEGACY)


def resolve_criterion(criterion: Any, options: dict[str, Any], *, who: str) -> Criterion:
    """The criterion object of ``criterion`` (an object, a name, or ``None`` for the default)
    and the legacy keyword ``options`` (``max_undo=...`` with ``criterion="descent"``, ...):
    each option goes to its criterion's constructor, checked there; an option of another
    criterion, or options beside an object, is a :class:`TypeError`.

    ``criterion=None`` is :class:`Always` (the strength-driven default), except that the
    descent gate's options without a criterion (``max_undo=``, ``resume_undo=``,
    ``smoothing=``) select :class:`DescentGate` with them, as they did when the gate was the
    default.

    Example:
        >>> from torch_recal.criteria import resolve_criterion
        >>> resolve_criterion(None, {}, who="f")
        Always()
        >>> resolve_criterion(None, {"max_undo": 0.4}, who="f").max_undo
        0.4
    """
    unknown = sorted(set(options) - set(_LEGACY))
    if unknown:
        raise TypeError(f"{who}: unexpected keyword argument `{unknown[0]}`")
    if criterion is None:
        if not options:
            return Always()
        other = [key for key in options if _LEGACY[key] is not DescentGate]
        if other:
            key = other[0]
            raise TypeError(
                f"{who}: `{key}` is an option of {_LEGACY[key].__name__}: pass "
                f"criterion={_LEGACY[key].__name__}({key}=...) (the default criterion, "
                "Always(), has no options)"
            )
        criterion = "descent"  # the gate's options alone: the gate, as before
    if isinstance(criterion, (DescentGate, RatioRule, Always, Budget)):
        if options:
            raise TypeError(
                f"{who}: `{next(iter(options))}` belongs in the criterion object "
                f"({type(criterion).__name__}(...)), not beside it"
            )
        return criterion
    if not isinstance(criterion, str):
        raise TypeError(
            f"{who}: `criterion` must be 'descent', 'ratio', 'always', a criterion object "
            f"(DescentGate, RatioRule, Always, Budget) or None, got {type(criterion).__name__}"
        )
    cls = _BY_NAME.get(criterion)
    if cls is None:
        raise ValueError(
            f"{who}: `criterion` must be one of {tuple(_BY_NAME)} or a criterion object, "
            f"got {criterion!r}"
        )
    for key in options:
        if _LEGACY[key] is not cls:
            raise TypeError(
                f"{who}: `{key}` is an option of {_LEGACY[key].__name__}, not of "
                f"criterion={criterion!r}"
            )
    try:
        return cls(**options)
    except (TypeError, ValueError) as error:
        raise type(error)(f"{who}: {str(error).split(': ', 1)[-1]}") from None


def describe(criterion: Criterion) -> dict[str, Any]:
    """Plain data of a criterion (its name and fields), for logs and reprs."""
    return {
        "name": criterion.name,
        **{f.name: getattr(criterion, f.name) for f in fields(criterion)},
    }
