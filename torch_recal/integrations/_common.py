"""What the trainer integrations share (private): the argument types, the options a
``CoherentRegCallback`` passes on, modules by name, epoch counters and state in JSON form (the
Hugging Face ``Trainer`` writes callback state to ``trainer_state.json``). The pieces' life
cycles are in ``_drivers.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypedDict

import torch
from torch import Tensor, nn

from torch_recal.criteria import Criterion
from torch_recal.heads import _unwrap, find_classifier

_log = logging.getLogger("torch_recal")

HeadSpec = str | nn.Module | Sequence[nn.Module] | None
LayersSpec = Sequence[str | nn.Module] | Callable[[nn.Module], Sequence[nn.Module]]
ParamsSpec = Callable[[nn.Module], Iterable[Any]] | None


class CoherentOptions(TypedDict, total=False):
    """Options of the :class:`~torch_recal.CoherentStrongReg` a ``CoherentRegCallback``
    builds (its constructor's keyword arguments but ``strength``, which the callback takes
    itself, and ``lr``, ``optimizer``, ``scaler``, which come from the trainer; with a budget
    and no ``total_steps``, the trainer's number of optimizer steps is used)."""

    target_sparsity: float
    kind: Literal["l1", "l2"]
    l1_mode: Literal["prox", "subgradient"]
    group: Literal["unit"] | None
    criterion: Literal["descent", "ratio", "always"] | Criterion
    total_steps: int
    max_undo: float
    resume_undo: float
    smoothing: float
    warmup: int | Literal["auto"]
    takeoff: float
    max_ratio: float | None
    min_cosine: float | None
    window: int
    reactivate: bool
    delay: int
    freeze_below: float | None
    weights_only: bool
    history_size: int


COHERENT_OPTIONS: tuple[str, ...] = tuple(CoherentOptions.__annotations__)


# --------------------------------------------------------------------------- modules by name
def module_of(model: nn.Module, spec: str | nn.Module, name: str, who: str) -> nn.Module:
    """The submodule ``spec`` names (``"net.fc"``), or ``spec`` itself if it is in ``model``."""
    if isinstance(spec, str):
        try:
            return model.get_submodule(spec)
        except AttributeError:
            raise ValueError(
                f"{who}: `{name}`={spec!r} names no submodule of {type(model).__name__}"
            ) from None
    if not any(m is spec for m in model.modules()):
        raise ValueError(
            f"{who}: `{name}` ({type(spec).__name__}) is not a submodule of the trained model "
            f"({type(model).__name__})"
        )
    return spec


def head_scope(model: nn.Module, who: str) -> nn.Module:
    """The (sub)model whose classifier :func:`find_classifier` finds: ``model`` itself, or,
    for a wrapper such as a ``LightningModule`` holding one network, that network."""
    model = _unwrap(model)
    try:
        find_classifier(model)
        return model
    except ValueError as error:
        children = [c for c in model.children() if next(c.parameters(), None) is not None]
        if len(children) == 1:
            try:
                return head_scope(children[0], who)
            except ValueError:
                pass
        raise ValueError(
            f"{who}: no classifier head found in {type(model).__name__} ({error}); pass "
            f"`head=` (a submodule name such as 'net.fc', or the module)"
        ) from None


def check_head(head: Any, name: str, who: str) -> HeadSpec:
    if head is None or isinstance(head, (str, nn.Module)):
        return head
    if isinstance(head, (list, tuple)) and head and all(isinstance(m, nn.Module) for m in head):
        return list(head)
    if isinstance(head, (list, tuple)) and not head:
        raise ValueError(f"{who}: `{name}` must not be an empty list")
    raise TypeError(
        f"{who}: `{name}` must be None (found automatically), a submodule name, a module or a "
        f"list of modules, got {type(head).__name__}"
    )


# --------------------------------------------------------------------------- counters
def completed_epochs(epoch: float) -> int:
    """Whole epochs in a trainer's fractional epoch counter (``2.0000000001`` -> 2)."""
    return math.floor(epoch + 1e-6)


# --------------------------------------------------------------------------- JSON state
_TENSOR = "__tensor__"


def to_json(value: Any) -> Any:
    """A state with tensors as ``{"__tensor__": nested list, "dtype": ..., "shape": ...}``:
    what ``json.dumps`` can write, exactly (floats are written to round-trip)."""
    if isinstance(value, Tensor):
        t = value.detach().cpu()
        return {_TENSOR: t.tolist(), "dtype": str(t.dtype).removeprefix("torch."),
                "shape": list(t.shape)}  # fmt: skip
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    return value


def from_json(value: Any) -> Any:
    """The inverse of :func:`to_json`."""
    if isinstance(value, Mapping):
        if _TENSOR in value:
            dtype = getattr(torch, str(value.get("dtype")), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"saved tensor state has an unknown dtype {value.get('dtype')!r}")
            return torch.tensor(value[_TENSOR], dtype=dtype).reshape(value["shape"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value
