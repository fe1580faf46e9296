"""The library's one torch.compile policy.

Pure elementwise hot paths (the calibration chain and its hand-written backward) are
compiled lazily, once per function, the first time they run eagerly. Rules:

* ``torch_recal.set_compile(False)`` or the environment variable ``TORCH_RECAL_COMPILE=0``
  switches every inner compile off (eager PyTorch ops are used instead).
* When the caller is itself being compiled or exported (``torch.compiler.is_compiling()``),
  the plain eager function runs, so that dynamo traces it into the user's graph: no nested
  compile, no graph break.
* If compiling fails (no C++ compiler, unsupported backend, ...), the eager function is used
  from then on and a single :class:`RuntimeWarning` says why. An error that the eager
  function raises as well (out of memory, bad input) is the caller's: it propagates (the
  eager function's own exception) and compiling stays on.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

from torch_recal._checks import check_flag

__all__ = ["compile_enabled", "lazy_compile", "set_compile"]

F = TypeVar("F", bound=Callable[..., Any])

_FALSE = {"0", "false", "no", "off"}
_enabled: bool = os.environ.get("TORCH_RECAL_COMPILE", "1").strip().lower() not in _FALSE
_registry: list[_LazyCompiled] = []


def set_compile(enabled: bool) -> None:
    """Switch torch-recal's internal ``torch.compile`` of its fused ops on or off.

    The default is on, unless the environment variable ``TORCH_RECAL_COMPILE`` is ``0``.
    Turning it off makes every op run as plain eager PyTorch (useful for debugging, or where
    compiling is slow or unavailable). Turning it back on also retries a compile that failed.

    Args:
        enabled: ``True`` to compile the fused ops lazily, ``False`` to run them eagerly.

    Raises:
        TypeError: ``enabled`` is not a bool.

    Example:
        >>> import torch_recal
        >>> torch_recal.set_compile(False)
        >>> torch_recal.compile_enabled()
        False
        >>> torch_recal.set_compile(True)
    """
    global _enabled
    _enabled = check_flag(enabled, "enabled", who="set_compile")
    if enabled:
        for fn in _registry:
            fn.reset()


def compile_enabled() -> bool:
    """Return whether torch-recal compiles its fused ops (see :func:`set_compile`).

    Example:
        >>> import torch_recal
        >>> isinstance(torch_recal.compile_enabled(), bool)
        True
    """
    return _enabled


def _is_compiling() -> bool:
    return bool(torch.compiler.is_compiling())


def _build(fn: Callable[..., Any], options: dict[str, Any]) -> Callable[..., Any]:
    return torch.compile(fn, **options)


class _LazyCompiled:
    """A pure function plus its lazily built compiled twin (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.fn = fn
        self.options = options
        self.compiled: Callable[..., Any] | None = None
        self.failed = False
        functools.update_wrapper(self, fn)

    def reset(self) -> None:
        self.compiled = None
        self.failed = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _is_compiling() or not _enabled or self.failed:
            return self.fn(*args, **kwargs)
        if self.compiled is None:
            self.compiled = _build(self.fn, self.options)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:
            # The eager function decides what failed: if it raises too (out of memory, bad
            # input), that is the caller's error and compiling stays on; if it succeeds, the
            # compile failed (no C++ compiler, unsupported backend): fall back once, loudly.
            out = self.fn(*args, **kwargs)
            self.failed = True
            warnings.warn(
                f"torch_recal: torch.compile of {self.fn.__qualname__} failed "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                "using eager PyTorch ops from now on. Set TORCH_RECAL_COMPILE=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
            return out


def lazy_compile(fn: F) -> F:
    """Compile ``fn`` lazily (``fullgraph=True``) under the library's policy (internal)."""
    lazy = _LazyCompiled(fn, {"fullgraph": True})
    _registry.append(lazy)
    return cast(F, lazy)
