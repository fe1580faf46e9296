"""Argument checks shared by every public entry point (private).

One rule for which exception a mistake gets (``docs/conventions.md``):

* the wrong *type* (a ``str`` where an ``int`` is expected, a ``bool`` where a number is
  expected, ``None`` where a module is expected) raises :class:`TypeError`;
* the right type with a bad *value* (out of range, not finite, not one of the options, a
  wrong shape) raises :class:`ValueError`.

Every message starts with the caller (``who``), names the argument in backquotes and says
what was expected and what was given: ``"RifleScheduler: `total_epochs` must be an int >= 1,
got 0"``. The checks return the value in its canonical Python type (``int``, ``float``,
``bool``, ``str``) so callers assign what was checked.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Collection, Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "check_choice",
    "check_device",
    "check_finite_tensor",
    "check_flag",
    "check_instance",
    "check_int",
    "check_optional_int",
    "check_optional_real",
    "check_real",
    "check_state_keys",
    "check_tensor",
]

_T = TypeVar("_T")


def _range_text(
    minimum: float | None,
    maximum: float | None,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if open_low else '>='} {minimum:g}")
    if maximum is not None:
        parts.append(f"{'<' if open_high else '<='} {maximum:g}")
    return " and ".join(parts)


def check_int(
    value: Any,
    name: str,
    *,
    who: str,
    minimum: int | None = None,
    maximum: int | None = None,
) -> int:
    """An ``int`` (not a ``bool``) in ``[minimum, maximum]``; returns it as a plain ``int``.

    Example:
        >>> check_int(3, "epochs", who="fit", minimum=1)
        3
        >>> check_int("3", "epochs", who="fit", minimum=1)
        Traceback (most recent call last):
        ...
        TypeError: fit: `epochs` must be an int >= 1, got '3' (str)
    """
    rng = _range_text(minimum, maximum)
    expected = "an int" + (f" {rng}" if rng else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{who}: `{name}` must be {expected}, got {value!r} ({type(value).__name__})"
        )
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{who}: `{name}` must be {expected}, got {value}")
    return value


def check_optional_int(
    value: Any, name: str, *, who: str, minimum: int | None = None, maximum: int | None = None
) -> int | None:
    """``None``, or what :func:`check_int` accepts."""
    if value is None:
        return None
    return check_int(value, name, who=who, minimum=minimum, maximum=maximum)


def check_real(
    value: Any,
    name: str,
    *,
    who: str,
    minimum: float | None = None,
    maximum: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
    finite: bool = True,
) -> float:
    """A real number (``int`` or ``float``, not ``bool``, not a tensor), finite unless
    ``finite=False``, in the given range (closed unless ``open_low``/``open_high``).

    Example:
        >>> check_real(0.5, "ema", who="GGR", minimum=0, maximum=1, open_high=True)
        0.5
        >>> check_real(float("nan"), "weight", who="GGR", minimum=0)
        Traceback (most recent call last):
        ...
        ValueError: GGR: `weight` must be a finite real number >= 0, got nan
    """
    rng = _range_text(minimum, maximum, open_low=open_low, open_high=open_high)
    expected = ("a finite real number" if finite else "a real number") + (f" {rng}" if rng else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"{who}: `{name}` must be {expected}, got {value!r} ({type(value).__name__})"
        )
    value = float(value)
    bad = (finite and not math.isfinite(value)) or math.isnan(value)
    if minimum is not None:
        bad = bad or value < minimum or (open_low and value == minimum)
    if maximum is not None:
        bad = bad or value > maximum or (open_high and value == maximum)
    if bad:
        raise ValueError(f"{who}: `{name}` must be {expected}, got {value!r}")
    return value


def check_optional_real(value: Any, name: str, *, who: str, **limits: Any) -> float | None:
    """``None``, or what :func:`check_real` accepts with the same limits."""
    return None if value is None else check_real(value, name, who=who, **limits)


def check_choice(value: Any, name: str, choices: Collection[str], *, who: str) -> str:
    """One of the string ``choices`` (a non-string is a ``TypeError``).

    Example:
        >>> check_choice("l1", "kind", ("l1", "l2"), who="CoherentStrongReg")
        'l1'
        >>> check_choice("L3", "kind", ("l1", "l2"), who="CoherentStrongReg")
        Traceback (most recent call last):
        ...
        ValueError: CoherentStrongReg: `kind` must be one of 'l1', 'l2', got 'L3'
    """
    options = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(
            f"{who}: `{name}` must be one of {options}, got {value!r} ({type(value).__name__})"
        )
    if value not in choices:
        raise ValueError(f"{who}: `{name}` must be one of {options}, got {value!r}")
    return value


def check_flag(value: Any, name: str, *, who: str) -> bool:
    """A ``bool`` (``0``/``1`` or strings are a ``TypeError``: ``"no"`` is not ``False``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{who}: `{name}` must be a bool, got {value!r} ({type(value).__name__})")
    return value


def check_instance(
    value: _T, name: str, types: type | tuple[type, ...], *, who: str, what: str | None = None
) -> _T:
    """``isinstance(value, types)`` or a ``TypeError`` saying what was expected."""
    if not isinstance(value, types):
        if what is None:
            names = types if isinstance(types, tuple) else (types,)
            what = " or ".join(t.__name__ for t in names)
        raise TypeError(f"{who}: `{name}` must be {what}, got {type(value).__name__}")
    return value


def check_tensor(
    value: Any,
    name: str,
    *,
    who: str,
    ndim: int | Iterable[int] | None = None,
    floating: bool = False,
    shape: tuple[int, ...] | None = None,
) -> Tensor:
    """A tensor (``TypeError`` otherwise) with the given rank, shape and kind of dtype
    (``ValueError`` otherwise)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{who}: `{name}` must be a Tensor, got {type(value).__name__}")
    if floating and not (value.is_floating_point()):
        raise TypeError(f"{who}: `{name}` must be a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            want = " or ".join(str(a) for a in allowed)
            raise ValueError(
                f"{who}: `{name}` must have {want} dims, got shape {tuple(value.shape)}"
            )
    if shape is not None and tuple(value.shape) != tuple(shape):
        raise ValueError(
            f"{who}: `{name}` must have shape {tuple(shape)}, got {tuple(value.shape)}"
        )
    return value


def check_finite_tensor(value: Tensor, name: str, *, who: str) -> Tensor:
    """Reject NaN/inf entries (one reduction and one host sync: for state and statistics,
    not for per-step hot paths)."""
    if (value.is_floating_point() or value.is_complex()) and not bool(torch.isfinite(value).all()):
        raise ValueError(f"{who}: `{name}` must be finite, got NaN or inf entries")
    return value


def check_state_keys(
    state: Any, required: Collection[str], *, who: str, optional: Collection[str] = ()
) -> Mapping[str, Any]:
    """A mapping with exactly the ``required`` keys (plus any of ``optional``)."""
    if not isinstance(state, Mapping):
        raise TypeError(f"{who}: `state_dict` must be a dict, got {type(state).__name__}")
    missing = sorted(set(required) - set(state))
    unknown = sorted(set(state) - set(required) - set(optional))
    if missing or unknown:
        raise ValueError(
            f"{who}: `state_dict` must have the keys {sorted(required)}"
            + (f"; missing {missing}" if missing else "")
            + (f"; unexpected {unknown}" if unknown else "")
        )
    return state


def check_device(value: Any, name: str, *, who: str) -> torch.device | None:
    """``None``, a :class:`torch.device` or a device string (``"cpu"``, ``"cuda:0"``)."""
    if value is None or isinstance(value, torch.device):
        return value
    if not isinstance(value, str):
        raise TypeError(
            f"{who}: `{name}` must be a torch.device, a device string or None, "
            f"got {value!r} ({type(value).__name__})"
        )
    try:
        return torch.device(value)
    except RuntimeError as err:
        raise ValueError(f"{who}: `{name}` must name a device, got {value!r} ({err})") from None
