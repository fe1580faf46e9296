"""The "after" mechanism of :func:`~torch_recal.calibrate` (private): a module whose output is
calibrated becomes an instance of a subclass of its own class that runs the original
``forward`` and then its child ``calibration``.

A tool that rebuilds such a module as another class and hands it the old children
(``nn.SyncBatchNorm.convert_sync_batchnorm``, Lightning's revert of it, timm's own) would
leave the calibration as an inert child. The inserted layer is therefore marked, and a global
*module-registration* hook (registered once per process, when the first calibrated class is
made; it never runs during a forward pass) gives any module that is handed a marked layer as
its ``calibration`` child the calibrated subclass of its own class.
"""

from __future__ import annotations

from typing import Any, cast

from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook
from torch.utils.hooks import RemovableHandle

from torch_recal.calibration import ResponseCalibration

# Marks a calibration inserted by _attach_after (a plain attribute: not in the state_dict;
# deepcopy and pickle keep it). "This layer calibrates the output of the module holding it."
_AFTER = "_recal_after"


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
_REGISTRATION_HOOK: RemovableHandle | None = None


def _calibrated_class(base: type[nn.Module]) -> type:
    global _REGISTRATION_HOOK
    if _REGISTRATION_HOOK is None:  # once per process, with the first calibrated class
        _REGISTRATION_HOOK = register_module_module_registration_hook(_on_register)
    cls = _SUBCLASSES.get(base)
    if cls is None:
        name = f"Calibrated{base.__name__}"
        cls = type(name, (_CalibratedOutput, base), {"_recal_base": base, "__module__": __name__})
        cls.__qualname__ = name
        _SUBCLASSES[base] = cls
    return cls


def _new_calibrated(base: type[nn.Module]) -> nn.Module:
    return cast(nn.Module, object.__new__(_calibrated_class(base)))


def _is_attached(module: object) -> bool:
    return isinstance(module, ResponseCalibration) and bool(module.__dict__.get(_AFTER, False))


def _on_register(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    """Before ``module.add_module(name, submodule)`` (or ``setattr``): a converter handing a
    rebuilt module the old one's children gives it an inserted calibration to apply too."""
    calibrated = isinstance(module, _CalibratedOutput)
    if name == "calibration" and _is_attached(submodule) and not calibrated:
        module.__class__ = _calibrated_class(type(module))


def _attach_after(module: nn.Module, calibration: nn.Module) -> None:
    module.__class__ = _calibrated_class(type(module))
    calibration.__dict__[_AFTER] = True
    module.add_module("calibration", calibration)


def _detach_after(module: nn.Module) -> None:
    calibration = module._modules.pop("calibration")
    if calibration is not None:
        calibration.__dict__.pop(_AFTER, None)
    if isinstance(module, _CalibratedOutput):
        module.__class__ = module._recal_base  # type: ignore[assignment]


def _left_behind(module: nn.Module, where: str) -> ResponseCalibration | None:
    """The calibration a class swap left on ``module`` without its wrapper (re-attach it).

    Raises ``ValueError`` when ``module`` has a ``calibration`` attribute of its own: the
    inserted layer would replace it, or be applied twice.
    """
    existing = module._modules.get("calibration")
    if _is_attached(existing):
        return cast(ResponseCalibration, existing)
    if hasattr(module, "calibration"):
        raise ValueError(
            f"calibrate: {where} already has a `calibration` attribute of its own; calibrate "
            "the layer whose output it uses instead"
        )
    return None
