"""calibrate(): insert ResponseCalibration into the residual blocks of an existing model.

No forward hooks are used (they break ``torch.compile(fullgraph=True)`` and
``torch.export``). Two hook-free mechanisms, both of which keep every existing
``state_dict`` key and only add new ones:

* **slot**: the block has an attribute that is ``None`` or holds a module applied right
  after the last norm of the residual branch (timm's ``se``, this library's own
  ``calibration``). An empty slot is filled with a :class:`ResponseCalibration`; an occupied
  one (e.g. an SE module) gets the calibration chained after it.
* **after**: the block has no slot (torchvision): the module whose output is calibrated
  (``bn2``/``bn3``) becomes an instance of a subclass of its own class whose ``forward`` runs
  the original ``forward`` and then its child ``calibration``. ``isinstance`` checks against
  the original class still hold, and :func:`uncalibrate` restores the original class.

Paper: Xu et al., https://arxiv.org/abs/2411.13582
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from torch_recal.calibration import ResponseCalibration

__all__ = ["calibrate", "is_calibrated", "register_block", "uncalibrate"]

ChannelsSpec = int | Callable[[nn.Module], int] | None
Predicate = Callable[[str, nn.Module], bool]


@dataclass(frozen=True)
class _BlockPolicy:
    after: str | None = None
    slot: str | None = None
    channels: ChannelsSpec = None

    def target_channels(self, block: nn.Module, target: nn.Module | None) -> int:
        if isinstance(self.channels, int):
            return self.channels
        if callable(self.channels):
            return int(self.channels(block))
        if target is None:
            raise ValueError(
                f"calibrate: cannot tell the channel count for the `{self.slot}` slot of "
                f"{type(block).__name__}; register the block with channels=<int or callable>"
            )
        return _infer_channels(target, type(block).__name__)


def _norm_width(attr: str) -> Callable[[nn.Module], int]:
    def channels(block: nn.Module) -> int:
        return int(getattr(getattr(block, attr), "num_features"))  # noqa: B009

    return channels


# Built-in policies, keyed by (module, class name) so torchvision/timm are never imported.
_BUILTIN: dict[tuple[str, str], _BlockPolicy] = {
    ("torchvision.models.resnet", "BasicBlock"): _BlockPolicy(after="bn2"),
    ("torchvision.models.resnet", "Bottleneck"): _BlockPolicy(after="bn3"),
    ("timm.models.resnet", "BasicBlock"): _BlockPolicy(slot="se", channels=_norm_width("bn2")),
    ("timm.models.resnet", "Bottleneck"): _BlockPolicy(slot="se", channels=_norm_width("bn3")),
    ("torch_recal.models", "BasicBlock"): _BlockPolicy(
        slot="calibration", channels=_norm_width("bn2")
    ),
}
_REGISTRY: dict[type, _BlockPolicy] = {}


def register_block(
    block_cls: type[nn.Module],
    *,
    after: str | None = None,
    slot: str | None = None,
    channels: ChannelsSpec = None,
) -> None:
    """Teach :func:`calibrate` where to put the calibration in your own residual block.

    Give exactly one of ``after`` (dotted path of the submodule, usually the last norm of
    the residual branch, whose output is calibrated) or ``slot`` (an attribute that is
    ``None`` or holds a module called on the residual branch right before the shortcut
    add; it is filled, or the calibration is chained after what it holds). Subclasses of
    ``block_cls`` match too.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        block_cls: the block class.
        after: submodule path, e.g. ``"bn2"``.
        slot: attribute name, e.g. ``"se"``.
        channels: channel count, or a callable ``block -> int``; inferred from the
            ``after`` module (``num_features``, ``num_channels``, ...) when omitted.

    Example:
        >>> from torch import nn
        >>> import torch_recal
        >>> class MyBlock(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.conv, self.norm = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        ...     def forward(self, x):
        ...         return (self.norm(self.conv(x)) + x).relu()
        >>> torch_recal.register_block(MyBlock, after="norm")
        >>> model = torch_recal.calibrate(nn.Sequential(MyBlock(), MyBlock()))
        >>> torch_recal.is_calibrated(model)
        True
    """
    if not (isinstance(block_cls, type) and issubclass(block_cls, nn.Module)):
        raise TypeError(
            f"register_block: `block_cls` must be an nn.Module class, not {block_cls!r}"
        )
    if (after is None) == (slot is None):
        raise ValueError("register_block: give exactly one of `after=` or `slot=`")
    for name, value in (("after", after), ("slot", slot)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"register_block: `{name}` must be a non-empty str, got {value!r}")
    bad_int = isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0
    if channels is not None and not callable(channels) and bad_int:
        raise ValueError(
            f"register_block: `channels` must be a positive int or a callable, got {channels!r}"
        )
    _REGISTRY[block_cls] = _BlockPolicy(after=after, slot=slot, channels=channels)


def _policy_for(module: nn.Module) -> _BlockPolicy | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        policy = _BUILTIN.get((cls.__module__, cls.__name__))
        if policy is not None:
            return policy
    return None


# --------------------------------------------------------------------------- "after" swap


class _CalibratedOutput:
    """Mixin: run the original ``forward``, then the ``calibration`` child."""

    _recal_base: type[nn.Module]
    calibration: nn.Module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.calibration(super().forward(*args, **kwargs))  # type: ignore[misc]

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Pickle as "the base class, re-wrapped": the dynamic class itself has no import path.
        reduced = list(object.__reduce_ex__(self, protocol))
        reduced[0], reduced[1] = _new_calibrated, (self._recal_base,)
        return tuple(reduced)


_SUBCLASSES: dict[type, type] = {}


def _calibrated_class(base: type[nn.Module]) -> type:
    cls = _SUBCLASSES.get(base)
    if cls is None:
        name = f"Calibrated{base.__name__}"
        cls = type(name, (_CalibratedOutput, base), {"_recal_base": base, "__module__": __name__})
        cls.__qualname__ = name
        _SUBCLASSES[base] = cls
    return cls


def _new_calibrated(base: type[nn.Module]) -> nn.Module:
    return cast(nn.Module, object.__new__(_calibrated_class(base)))


def _attach_after(module: nn.Module, calibration: nn.Module) -> None:
    module.__class__ = _calibrated_class(type(module))
    module.add_module("calibration", calibration)


def _detach_after(module: nn.Module) -> None:
    del module.calibration
    module.__class__ = type(module)._recal_base  # type: ignore[attr-defined]


# --------------------------------------------------------------------------------- helpers


def _infer_channels(module: nn.Module, where: str) -> int:
    for attr in ("num_features", "num_channels", "out_channels", "out_features"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    shape = getattr(module, "normalized_shape", None)
    if isinstance(shape, Sequence) and len(shape) > 0:
        return int(shape[-1])
    raise ValueError(
        f"calibrate: cannot infer the channel count of {type(module).__name__} in {where} "
        "(looked for num_features, num_channels, out_channels, out_features, "
        "normalized_shape); pass a norm/conv/linear layer or register_block(channels=...)"
    )


def _default_channel_dim(module: nn.Module) -> int:
    return -1 if isinstance(module, (nn.LayerNorm, nn.Linear)) else 1


def _factory_kwargs(module: nn.Module) -> dict[str, Any]:
    tensor: torch.Tensor | None = next(module.parameters(), None)
    if tensor is None:
        tensor = next(module.buffers(), None)
    if tensor is None or not tensor.is_floating_point():
        return {}
    return {"device": tensor.device, "dtype": tensor.dtype}


def _make(
    channels: int, reduction: int, layer_kwargs: dict[str, Any], where: nn.Module, channel_dim: int
) -> ResponseCalibration:
    kwargs = {"channel_dim": channel_dim, **_factory_kwargs(where), **layer_kwargs}
    return ResponseCalibration(channels, reduction, **kwargs)


def is_calibrated(model: nn.Module) -> bool:
    """Return whether ``model`` contains a calibration inserted by :func:`calibrate`.

    Example:
        >>> from torch_recal import calibrate, is_calibrated
        >>> from torch_recal.models import resnet20
        >>> model = resnet20(num_classes=10)
        >>> is_calibrated(model), is_calibrated(calibrate(model))
        (False, True)
    """
    return any(
        isinstance(m, _CalibratedOutput) or getattr(m, "_recal_filled_slot", None) is not None
        for m in model.modules()
    )


# ------------------------------------------------------------------------------ calibrate


def calibrate(
    model: nn.Module,
    *,
    reduction: int = 4,
    targets: Iterable[str] | Predicate | None = None,
    inplace: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    **layer_kwargs: Any,
) -> nn.Module:
    """Insert a :class:`ResponseCalibration` into every residual block of ``model``.

    Recognised out of the box: torchvision ``BasicBlock``/``Bottleneck`` (after
    ``bn2``/``bn3``), timm ResNet-family blocks (their ``se`` slot: filled, or chained after
    an existing SE module) and this library's :mod:`torch_recal.models`; more via
    :func:`register_block`. For any other model pass ``targets=``: module names, or a
    predicate ``(name, module) -> bool``, picking the layers (usually norms) whose output is
    calibrated. Existing ``state_dict`` keys are unchanged, so pretrained checkpoints still
    load (``strict=False`` reports only the new calibration keys as missing). Calling it
    twice changes nothing; :func:`uncalibrate` undoes it. Create the optimizer after
    calling it, or pass ``optimizer=`` to add the new parameters as a param group.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        model: the model to change.
        reduction: MLP reduction of each inserted layer (4 in the paper's CIFAR models, 16
            in its ImageNet models).
        targets: names or a predicate selecting the layers to calibrate instead of blocks.
        inplace: change ``model`` itself (default) or a deep copy of it.
        optimizer: if given, the new parameters are added to it as one param group.
        **layer_kwargs: passed to :class:`ResponseCalibration` (``eps``, ``confidence``,
            ``stats``, ``channel_dim``).

    Returns:
        The calibrated model (``model`` itself when ``inplace=True``).

    Raises:
        ValueError: nothing matched, an unknown target name, or bad layer arguments.

    Example:
        >>> import torch
        >>> from torch_recal import calibrate
        >>> from torch_recal.models import resnet20
        >>> model = calibrate(resnet20(num_classes=10, in_chans=1))
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"calibrate: `model` must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    # Plan every edit first (this is where errors are raised), then apply: no half-edits.
    edits: list[Callable[[], None]] = []
    new_params: list[nn.Parameter] = []
    if targets is None:
        recognised = _plan_blocks(model, reduction, layer_kwargs, edits, new_params)
        if recognised == 0:
            raise ValueError(
                f"calibrate: no residual block recognised in {type(model).__name__}. Looked "
                f"for: {_known_blocks()}. Pass targets=[names] or a predicate (name, module) "
                "-> bool to pick the layers to calibrate, or register_block(YourBlock, "
                "after='bn2')."
            )
    else:
        _plan_targets(model, targets, reduction, layer_kwargs, edits, new_params)
    for edit in edits:
        edit()
    if optimizer is not None and new_params:
        optimizer.add_param_group({"params": new_params})
    return model


def _known_blocks() -> str:
    names = [f"{m}.{n}" for m, n in _BUILTIN] + [
        f"{c.__module__}.{c.__qualname__}" for c in _REGISTRY
    ]
    return ", ".join(names)


def _plan_blocks(
    model: nn.Module,
    reduction: int,
    layer_kwargs: dict[str, Any],
    edits: list[Callable[[], None]],
    new_params: list[nn.Parameter],
) -> int:
    recognised = 0
    for name, block in model.named_modules():
        policy = _policy_for(block)
        if policy is None:
            continue
        recognised += 1
        where = f"{name or 'model'} ({type(block).__name__})"
        if policy.after is not None:
            target = block.get_submodule(policy.after)
            if isinstance(target, _CalibratedOutput):
                continue
            channels = policy.target_channels(block, target)
            layer = _make(channels, reduction, layer_kwargs, block, 1)
            edits.append(functools.partial(_attach_after, target, layer))
        else:
            slot = policy.slot
            assert slot is not None
            occupant = getattr(block, slot, None)
            if getattr(block, "_recal_filled_slot", None) is not None or isinstance(
                occupant, (ResponseCalibration, _CalibratedOutput)
            ):
                continue
            if occupant is not None and not isinstance(occupant, nn.Module):
                raise ValueError(f"calibrate: slot `{slot}` of {where} holds {occupant!r}")
            channels = policy.target_channels(block, None)
            layer = _make(channels, reduction, layer_kwargs, block, 1)
            if occupant is None or isinstance(occupant, nn.Identity):
                edits.append(functools.partial(_fill_slot, block, slot, layer, occupant))
            else:
                edits.append(functools.partial(_attach_after, occupant, layer))
        new_params.extend(layer.parameters())
    return recognised


def _fill_slot(block: nn.Module, slot: str, layer: nn.Module, occupant: nn.Module | None) -> None:
    if slot in block._modules:
        del block._modules[slot]
    elif slot in block.__dict__:
        del block.__dict__[slot]
    setattr(block, slot, layer)
    block.__dict__["_recal_filled_slot"] = (slot, occupant)  # plain attribute, not a child


def _plan_targets(
    model: nn.Module,
    targets: Iterable[str] | Predicate,
    reduction: int,
    layer_kwargs: dict[str, Any],
    edits: list[Callable[[], None]],
    new_params: list[nn.Parameter],
) -> None:
    modules = dict(model.named_modules())
    if callable(targets):
        chosen = [n for n, m in modules.items() if targets(n, m)]
    elif isinstance(targets, str):
        raise TypeError("calibrate: `targets` must be a list of module names, not a single str")
    else:
        chosen = list(targets)
        unknown = [n for n in chosen if n not in modules]
        if unknown:
            raise ValueError(
                f"calibrate: targets {unknown} are not module names of {type(model).__name__} "
                "(see model.named_modules())"
            )
    if not chosen:
        raise ValueError("calibrate: `targets` selected no module")
    for name in chosen:
        target = modules[name]
        if isinstance(target, _CalibratedOutput):
            continue
        channels = _infer_channels(target, name)
        layer = _make(channels, reduction, layer_kwargs, target, _default_channel_dim(target))
        edits.append(functools.partial(_attach_after, target, layer))
        new_params.extend(layer.parameters())


def uncalibrate(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Remove every calibration that :func:`calibrate` inserted, restoring the original.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        model: a model passed through :func:`calibrate` (others are returned unchanged).
        inplace: change ``model`` itself (default) or a deep copy.

    Returns:
        The model, with the original module classes, slots and ``state_dict`` keys.

    Example:
        >>> from torch_recal import calibrate, uncalibrate
        >>> from torch_recal.models import resnet20
        >>> model = resnet20()
        >>> keys = set(model.state_dict())
        >>> set(uncalibrate(calibrate(model)).state_dict()) == keys
        True
    """
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, _CalibratedOutput):
            _detach_after(module)
        filled = getattr(module, "_recal_filled_slot", None)
        if filled is not None:
            slot, occupant = filled
            del module._recal_filled_slot
            del module._modules[slot]
            setattr(module, slot, occupant)
    return model
