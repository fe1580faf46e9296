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

The calibration survives a converter that rebuilds such a module as another class
(``nn.SyncBatchNorm.convert_sync_batchnorm``): see :mod:`torch_recal._calibrated_output`.

Paper: Xu et al., https://arxiv.org/abs/2411.13582
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import nn
from typing_extensions import TypedDict, Unpack

from torch_recal._calibrated_output import (
    _attach_after,
    _CalibratedOutput,
    _detach_after,
    _is_attached,
    _left_behind,
)
from torch_recal._checks import check_flag, check_instance, check_int
from torch_recal.calibration import ResponseCalibration, Stats, _check_dtype, _check_layer_options
from torch_recal.functional import ChannelDim, Confidence

__all__ = ["calibrate", "is_calibrated", "register_block", "uncalibrate"]

ChannelsSpec = int | Callable[[nn.Module], int] | None
Predicate = Callable[[str, nn.Module], bool]


class LayerOptions(TypedDict, total=False):
    """Options of the inserted :class:`ResponseCalibration` layers (``calibrate(**options)``)."""

    eps: float
    confidence: Confidence
    stats: Stats
    channel_dim: ChannelDim
    device: torch.device | str | None
    dtype: torch.dtype | None


_LAYER_OPTIONS = ("eps", "confidence", "stats", "channel_dim", "device", "dtype")


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

    Raises:
        TypeError: ``block_cls`` is not an ``nn.Module`` class, or an argument has the wrong
            type.
        ValueError: neither or both of ``after`` and ``slot``, an empty name, or
            ``channels < 1``.

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
    who = "register_block"
    if not (isinstance(block_cls, type) and issubclass(block_cls, nn.Module)):
        raise TypeError(f"{who}: `block_cls` must be an nn.Module class, got {block_cls!r}")
    for name, value in (("after", after), ("slot", slot)):
        if value is not None and not isinstance(value, str):
            raise TypeError(
                f"{who}: `{name}` must be a str or None, got {value!r} ({type(value).__name__})"
            )
        if value == "":
            raise ValueError(f"{who}: `{name}` must be a non-empty str, got ''")
    if (after is None) == (slot is None):
        raise ValueError(
            f"{who}: give exactly one of `after` or `slot`, got after={after!r}, slot={slot!r}"
        )
    if channels is not None and not callable(channels):
        channels = check_int(channels, "channels", who=who, minimum=1)
    _REGISTRY[block_cls] = _BlockPolicy(after=after, slot=slot, channels=channels)


def _policy_for(module: nn.Module) -> _BlockPolicy | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
        policy = _BUILTIN.get((cls.__module__, cls.__name__))
        if policy is not None:
            return policy
    return None


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
    channels: Callable[[], int],
    reduction: int,
    layer_kwargs: dict[str, Any],
    where: nn.Module,
    channel_dim: int,
) -> ResponseCalibration:
    kwargs = {"channel_dim": channel_dim, **_factory_kwargs(where), **layer_kwargs}
    return ResponseCalibration(channels(), reduction, **kwargs)


def _check_model(model: Any, who: str) -> nn.Module:
    return check_instance(model, "model", nn.Module, who=who, what="an nn.Module")


def is_calibrated(model: nn.Module) -> bool:
    """Return whether ``model`` contains a calibration inserted by :func:`calibrate`.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        model: any module.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.

    Example:
        >>> from torch_recal import calibrate, is_calibrated
        >>> from torch_recal.models import resnet20
        >>> model = resnet20(num_classes=10)
        >>> is_calibrated(model), is_calibrated(calibrate(model))
        (False, True)
    """
    _check_model(model, "is_calibrated")
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
    **layer_kwargs: Unpack[LayerOptions],
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
    calling it, or pass ``optimizer=`` to add the new parameters as a param group. A
    calibrated norm stays calibrated when a converter rebuilds it and hands it its children
    (``nn.SyncBatchNorm.convert_sync_batchnorm(model)``, before or after this call).

    Every edit is planned and checked before the first one is made: after an error the
    model and the optimizer are exactly as they were.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        model: the model to change.
        reduction: MLP reduction of each inserted layer (4 in the paper's CIFAR models, 16
            in its ImageNet models).
        targets: names or a predicate selecting the layers to calibrate instead of blocks
            (a predicate never selects the layers inside an inserted calibration).
        inplace: change ``model`` itself (default) or a deep copy of it.
        optimizer: if given, the new parameters are added to it as one param group (only
            with ``inplace=True``: the optimizer holds the original model's parameters).
        **layer_kwargs: passed to :class:`ResponseCalibration` (``eps``, ``confidence``,
            ``stats``, ``channel_dim``, ``device``, ``dtype``; by default the device and
            dtype of the layer that is calibrated).

    Returns:
        The calibrated model (``model`` itself when ``inplace=True``).

    Raises:
        TypeError: an argument of the wrong type (``model``, ``optimizer``, ``targets`` or
            its entries, a layer option) or an unknown layer option.
        ValueError: nothing matched, an unknown or repeated target name, two blocks that
            share the module to calibrate, a module to calibrate after that has a
            ``calibration`` attribute of its own, a layer whose channels cannot be inferred,
            or a bad layer option value.

    Example:
        >>> import torch
        >>> from torch_recal import calibrate
        >>> from torch_recal.models import resnet20
        >>> model = calibrate(resnet20(num_classes=10, in_chans=1))
        >>> model(torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """
    who = "calibrate"
    _check_model(model, who)
    options = dict(layer_kwargs)
    unknown = sorted(set(options) - set(_LAYER_OPTIONS))
    if unknown:
        raise TypeError(
            f"{who}: unexpected keyword argument `{unknown[0]}`; the layer options are "
            + ", ".join(_LAYER_OPTIONS)
        )
    reduction, *_ = _check_layer_options(
        reduction,
        options.get("eps", 1e-5),
        options.get("confidence", "cdf"),
        options.get("stats", "predicted"),
        options.get("channel_dim", 1),
        who=who,
    )
    _check_dtype(options.get("dtype"), who=who)
    inplace = check_flag(inplace, "inplace", who=who)
    if optimizer is not None:
        check_instance(
            optimizer, "optimizer", torch.optim.Optimizer, who=who,
            what="a torch.optim.Optimizer or None",
        )  # fmt: skip
        if not inplace:
            raise ValueError(
                f"{who}: `optimizer` needs inplace=True (it holds the parameters of the "
                "original model, not of the copy); create the copy's optimizer after calibrate"
            )
    names = None if targets is None or _is_predicate(targets) else _check_target_names(targets)
    if not inplace:
        model = copy.deepcopy(model)
    # Plan every edit first (this is where errors are raised), then apply: no half-edits.
    plan = _Plan()
    if targets is None:
        recognised = _plan_blocks(model, reduction, options, plan)
        if recognised == 0:
            raise ValueError(
                f"calibrate: no residual block recognised in {type(model).__name__}. Looked "
                f"for: {_known_blocks()}. Pass targets=[names] or a predicate (name, module) "
                "-> bool to pick the layers to calibrate, or register_block(YourBlock, "
                "after='bn2')."
            )
    else:
        chosen = names if names is not None else _select(model, cast(Predicate, targets))
        _plan_targets(model, chosen, reduction, options, plan)
    if optimizer is not None and plan.new_params:
        optimizer.add_param_group({"params": plan.new_params})
    for edit in plan.edits:
        edit()
    return model


def _is_predicate(targets: object) -> bool:
    return callable(targets) and not isinstance(targets, (str, type))


def _check_target_names(targets: object) -> list[str]:
    who = "calibrate"
    if isinstance(targets, str) or not isinstance(targets, Iterable):
        raise TypeError(
            f"{who}: `targets` must be a list of module names or a predicate "
            f"(name, module) -> bool, got {targets!r} ({type(targets).__name__})"
        )
    names = list(targets)
    for name in names:
        if not isinstance(name, str):
            raise TypeError(
                f"{who}: `targets` must hold module names (str), got {name!r} "
                f"({type(name).__name__})"
            )
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"{who}: `targets` names {repeated} more than once")
    return names


def _known_blocks() -> str:
    names = [f"{m}.{n}" for m, n in _BUILTIN] + [
        f"{c.__module__}.{c.__qualname__}" for c in _REGISTRY
    ]
    return ", ".join(names)


@dataclass
class _Plan:
    """The planned edits, the new parameters, and which module each edit claims."""

    edits: list[Callable[[], None]] = field(default_factory=list)
    new_params: list[nn.Parameter] = field(default_factory=list)
    claimed: dict[int, str] = field(default_factory=dict)

    def claim(self, module: nn.Module, where: str, hint: str) -> None:
        """Refuse a second edit of the same module (its class would be swapped twice)."""
        previous = self.claimed.get(id(module))
        if previous is not None:
            raise ValueError(
                f"calibrate: {previous} and {where} share one {type(module).__name__} to "
                f"calibrate after; {hint}"
            )
        self.claimed[id(module)] = where

    def add(self, edit: Callable[[], None], layer: ResponseCalibration) -> None:
        self.edits.append(edit)
        self.new_params.extend(layer.parameters())

    def after(
        self, module: nn.Module, where: str, hint: str, make: Callable[[], ResponseCalibration]
    ) -> None:
        """Calibrate ``module``'s output: re-attach the layer a class swap left, else a new one."""
        self.claim(module, where, hint)
        layer = _left_behind(module, where)
        if layer is not None:
            self.edits.append(functools.partial(_attach_after, module, layer))
            return
        layer = make()
        self.add(functools.partial(_attach_after, module, layer), layer)


def _plan_blocks(
    model: nn.Module, reduction: int, layer_kwargs: dict[str, Any], plan: _Plan
) -> int:
    recognised = 0
    hint = "give each block its own module, or pick the layers with targets="
    for name, block in model.named_modules():
        policy = _policy_for(block)
        if policy is None:
            continue
        recognised += 1
        where = f"`{name or 'model'}` ({type(block).__name__})"
        if policy.after is not None:
            try:
                target = block.get_submodule(policy.after)
            except AttributeError:
                raise ValueError(
                    f"calibrate: the `after` module {policy.after!r} of the policy for "
                    f"{type(block).__name__} is not a submodule of {where}"
                ) from None
            if isinstance(target, _CalibratedOutput):
                continue
            channels = functools.partial(policy.target_channels, block, target)
            make = functools.partial(_make, channels, reduction, layer_kwargs, block, 1)
            plan.after(target, f"{where}.{policy.after}", hint, make)
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
            channels = functools.partial(policy.target_channels, block, None)
            make = functools.partial(_make, channels, reduction, layer_kwargs, block, 1)
            if occupant is None or isinstance(occupant, nn.Identity):
                layer = make()
                plan.add(functools.partial(_fill_slot, block, slot, layer, occupant), layer)
            else:
                plan.after(occupant, f"{where}.{slot}", hint, make)
    return recognised


def _fill_slot(block: nn.Module, slot: str, layer: nn.Module, occupant: nn.Module | None) -> None:
    if slot in block._modules:
        del block._modules[slot]
    elif slot in block.__dict__:
        del block.__dict__[slot]
    setattr(block, slot, layer)
    block.__dict__["_recal_filled_slot"] = (slot, occupant)  # plain attribute, not a child


def _select(model: nn.Module, predicate: Predicate) -> list[str]:
    """The names the predicate picks, leaving out the layers inside inserted calibrations."""
    inside = {
        id(m) for rc in model.modules() if isinstance(rc, ResponseCalibration) for m in rc.modules()
    }
    return [n for n, m in model.named_modules() if id(m) not in inside and predicate(n, m)]


def _plan_targets(
    model: nn.Module,
    chosen: list[str],
    reduction: int,
    layer_kwargs: dict[str, Any],
    plan: _Plan,
) -> None:
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = [n for n in chosen if n not in modules]
    if unknown:
        raise ValueError(
            f"calibrate: `targets` {unknown} are not module names of {type(model).__name__} "
            "(see model.named_modules())"
        )
    if not chosen:
        raise ValueError("calibrate: `targets` selected no module")
    hint = "name each module once in `targets`"
    for name in chosen:
        target = modules[name]
        if isinstance(target, _CalibratedOutput):
            continue
        channels = functools.partial(_infer_channels, target, name)
        make = functools.partial(
            _make, channels, reduction, layer_kwargs, target, _default_channel_dim(target)
        )
        plan.after(target, f"target `{name}`", hint, make)


def uncalibrate(model: nn.Module, *, inplace: bool = True) -> nn.Module:
    """Remove every calibration that :func:`calibrate` inserted, restoring the original.

    Paper: Xu et al., https://arxiv.org/abs/2411.13582

    Args:
        model: a model passed through :func:`calibrate` (others are returned unchanged).
        inplace: change ``model`` itself (default) or a deep copy.

    Returns:
        The model, with the original module classes, slots and ``state_dict`` keys.

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``inplace`` is not a bool.

    Example:
        >>> from torch_recal import calibrate, uncalibrate
        >>> from torch_recal.models import resnet20
        >>> model = resnet20()
        >>> keys = set(model.state_dict())
        >>> set(uncalibrate(calibrate(model)).state_dict()) == keys
        True
    """
    who = "uncalibrate"
    _check_model(model, who)
    inplace = check_flag(inplace, "inplace", who=who)
    if not inplace:
        model = copy.deepcopy(model)
    for module in list(model.modules()):
        if isinstance(module, _CalibratedOutput) or _is_attached(
            module._modules.get("calibration")
        ):
            _detach_after(module)  # also a layer that a class swap left without its wrapper
        filled = getattr(module, "_recal_filled_slot", None)
        if filled is not None:
            slot, occupant = filled
            del module._recal_filled_slot
            del module._modules[slot]
            setattr(module, slot, occupant)
    return model
