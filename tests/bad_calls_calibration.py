"""Bad-call rows (tests/test_bad_calls.py): ResponseCalibration, calibrate, uncalibrate,
is_calibrated, register_block, the response-calibration functional forms, torch_recal.models,
set_compile.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import torch_recal
from tests.badcalls import Bad
from torch_recal import functional as RF
from torch_recal import (
    models,
)
from torch_recal.models import resnet20

CASES: list[Bad] = []

# --------------------------------------------------------------------------- calibration,
# surgery, models, functional, generative (S2)
# S2a: ResponseCalibration (and its forward), calibrate/uncalibrate/is_calibrated/register_block,
# the response-calibration functional forms, torch_recal.models, set_compile.


def _rows(
    entry: str,
    fn: Callable[..., Any],
    rows: list[tuple[Any, ...]],
    make: Callable[[], Any] | None = None,
) -> list[Bad]:
    """``Bad`` rows for ``fn(ctx?, *args, **kwargs)``: each row is ``(args, kwargs, error,
    argument)``; with ``make``, the fresh context is passed as the first argument."""
    out = []
    for i, (args, kwargs, error, argument) in enumerate(rows):

        def call(ctx: Any, args: Any = args, kwargs: Any = kwargs) -> Any:
            return fn(*((ctx,) if make is not None else ()), *args, **kwargs)

        out.append(Bad(entry, call, error, f"`{argument}`", make=make, id=f"{entry}-{i}"))
    return out


def _cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.GroupNorm(4, 12), nn.ReLU(),
    )  # fmt: skip


class _SharedNormBlock(nn.Module):
    """A residual block whose norm may be shared with another block."""

    def __init__(self, norm: nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv, self.norm = nn.Conv2d(8, 8, 3, padding=1), norm

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.norm(self.conv(x)) + x)


def _shared_norm_model() -> nn.Module:
    torch_recal.register_block(_SharedNormBlock, after="norm")  # a test-only class
    norm = nn.BatchNorm2d(8)
    return nn.Sequential(_SharedNormBlock(norm), _SharedNormBlock(norm))


def _resnet_and_sgd() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = resnet20()
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _u(*shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> Tensor:
    return torch.ones(shape, dtype=dtype, device=device)


_RC = torch_recal.ResponseCalibration
_U, _MU, _SIGMA = _u(2, 4, 3, 3), _u(2, 4), _u(2, 4)
_BAD_U = [  # the same bad responses for the module and the functional forms
    (([[1.0]],), TypeError),
    ((_u(2, 4, 3, 3, dtype=torch.int64),), TypeError),
    ((_u(2, 4, 3, 3, dtype=torch.bool),), TypeError),
    ((_u(2, 4, 3, 3, dtype=torch.complex64),), TypeError),
    ((_u(2, 4),), ValueError),
]

CASES += _rows("ResponseCalibration", _RC, [
    ((), {"channels": "8"}, TypeError, "channels"),
    ((), {"channels": True}, TypeError, "channels"),
    ((), {"channels": 0}, ValueError, "channels"),
    ((4,), {"reduction": 2.0}, TypeError, "reduction"),
    ((4,), {"reduction": 0}, ValueError, "reduction"),
    ((4,), {"eps": "1e-5"}, TypeError, "eps"),
    ((4,), {"eps": 0.0}, ValueError, "eps"),
    ((4,), {"eps": math.inf}, ValueError, "eps"),
    ((4,), {"eps": math.nan}, ValueError, "eps"),
    ((4,), {"confidence": 1}, TypeError, "confidence"),
    ((4,), {"confidence": "gauss"}, ValueError, "confidence"),
    ((4,), {"stats": None}, TypeError, "stats"),
    ((4,), {"stats": "running"}, ValueError, "stats"),
    ((4,), {"channel_dim": "1"}, TypeError, "channel_dim"),
    ((4,), {"channel_dim": 2}, ValueError, "channel_dim"),
    ((4,), {"dtype": "float32"}, TypeError, "dtype"),
    ((4,), {"dtype": torch.int64}, ValueError, "dtype"),
])  # fmt: skip
# the layer's forward on a fresh layer: the error names the input, the layer is unchanged
CASES += _rows("ResponseCalibration.forward", lambda rc, *a, **k: rc(*a, **k), [
    *((args, {}, error, "u") for args, error in _BAD_U),
    ((_u(2, 5, 3, 3),), {}, ValueError, "u"),  # 5 channels, the layer has 4
    ((_u(2, 4, 3, 3, device="meta"),), {}, ValueError, "u"),  # not the layer's device
    ((_U, [1.0]), {}, TypeError, "shortcut"),
    ((_U, _u(2, 4, 3, 3, dtype=torch.int32)), {}, TypeError, "shortcut"),
    ((_U, _u(2, 4, 3, 1)), {}, ValueError, "shortcut"),
    ((_U, _U), {"relu": 1}, TypeError, "relu"),
], make=lambda: _RC(4))  # fmt: skip
CASES += _rows("ResponseCalibration.statistics", lambda rc, u: rc.statistics(u), [
    ((_u(2, 4),), {}, ValueError, "u"),
], make=lambda: _RC(4))  # fmt: skip
# calibrate: everything is checked and planned before the first edit, so the model and the
# optimizer are unchanged after every error
CASES += _rows("calibrate", torch_recal.calibrate, [
    ((), {"optimizer": "sgd"}, TypeError, "optimizer"),
    ((), {"reduction": "4"}, TypeError, "reduction"),
    ((), {"reduction": 0}, ValueError, "reduction"),
    ((), {"inplace": 1}, TypeError, "inplace"),
    ((), {"eps": -1.0}, ValueError, "eps"),
    ((), {"confidence": "x"}, ValueError, "confidence"),
    ((), {"stats": 3}, TypeError, "stats"),
    ((), {"channel_dim": 0}, ValueError, "channel_dim"),
    ((), {"dtype": torch.int32}, ValueError, "dtype"),
    ((), {"eta": 1}, TypeError, "eta"),
], make=resnet20)  # fmt: skip
CASES += _rows("calibrate", torch_recal.calibrate, [
    ((), {"targets": ["1", "1"]}, ValueError, "targets"),  # the same module twice
    ((), {"targets": ["1", "nope"]}, ValueError, "targets"),
    ((), {"targets": "1"}, TypeError, "targets"),
    ((), {"targets": [1]}, TypeError, "targets"),
    ((), {"targets": 1}, TypeError, "targets"),
    ((), {"targets": lambda name, module: False}, ValueError, "targets"),
], make=_cnn)  # fmt: skip
CASES += [
    Bad("calibrate", lambda _: torch_recal.calibrate(None), TypeError, "`model`"),
    Bad("calibrate", lambda ctx: torch_recal.calibrate(ctx[0], optimizer=ctx[1], inplace=False),
        ValueError, "`optimizer`", make=_resnet_and_sgd),
    Bad("calibrate", lambda ctx: torch_recal.calibrate(ctx[0], optimizer=ctx[1], eps=0.0),
        ValueError, "`eps`", make=_resnet_and_sgd),
    # "2" is a ReLU (no channel count): "1", planned first, must stay untouched
    Bad("calibrate", lambda m: torch_recal.calibrate(m, targets=["1", "2"]), ValueError,
        "channel count", make=_cnn),
    Bad("calibrate", torch_recal.calibrate, ValueError, "no residual block", make=_cnn),
    Bad("calibrate", torch_recal.calibrate, ValueError, "share", make=_shared_norm_model,
        id="calibrate-shared-norm"),
    # one norm under two names: the second edit would swap its class twice
    Bad("calibrate", lambda m: torch_recal.calibrate(m, targets=["0", "1"]), ValueError,
        "share", make=lambda: nn.Sequential(*[nn.BatchNorm2d(4)] * 2), id="calibrate-alias"),
    # a target with a `calibration` of its own (this block's slot): it would be replaced
    Bad("calibrate", lambda m: torch_recal.calibrate(m, targets=["layer1.1.bn1", "layer1.0"]),
        ValueError, "`calibration`", make=lambda: resnet20(calibrated=True),
        id="calibrate-own-calibration"),
    Bad("uncalibrate", lambda _: torch_recal.uncalibrate(None), TypeError, "`model`"),
    Bad("uncalibrate", lambda m: torch_recal.uncalibrate(m, inplace="no"), TypeError,
        "`inplace`", make=lambda: torch_recal.calibrate(resnet20())),
    Bad("is_calibrated", lambda _: torch_recal.is_calibrated(None), TypeError, "`model`"),
]  # fmt: skip
# register_block: the registry is unchanged after an error
CASES += _rows("register_block", lambda _, *a, **k: torch_recal.register_block(*a, **k), [
    ((None,), {"after": "bn2"}, TypeError, "block_cls"),
    ((nn.Identity,), {}, ValueError, "after"),
    ((nn.Identity,), {"after": "a", "slot": "b"}, ValueError, "slot"),
    ((nn.Identity,), {"after": 5}, TypeError, "after"),
    ((nn.Identity,), {"slot": ""}, ValueError, "slot"),
    ((nn.Identity,), {"after": "x", "channels": "8"}, TypeError, "channels"),
    ((nn.Identity,), {"after": "x", "channels": 0}, ValueError, "channels"),
], make=lambda: torch_recal.surgery._REGISTRY)  # fmt: skip
# the functional forms check like the module
CASES += _rows("functional.response_calibration", RF.response_calibration, [
    *(((*args, _MU, _SIGMA), {}, error, "u") for args, error in _BAD_U),
    ((_U, _MU.numpy(), _SIGMA), {}, TypeError, "mu"),
    ((_U, _MU.long(), _SIGMA), {}, TypeError, "mu"),
    ((_U, _u(3, 4), _SIGMA), {}, ValueError, "mu"),
    ((_U, _MU, _u(5)), {}, ValueError, "sigma"),
    ((_U, _MU, _u(2, 4, device="meta")), {}, ValueError, "sigma"),
    ((_U, _MU, _SIGMA), {"eps": 0}, ValueError, "eps"),
    ((_U, _MU, _SIGMA), {"eps": math.inf}, ValueError, "eps"),
    ((_U, _MU, _SIGMA), {"confidence": "x"}, ValueError, "confidence"),
    ((_U, _MU, _SIGMA), {"channel_dim": 0}, ValueError, "channel_dim"),
])  # fmt: skip
CASES += _rows("functional.response_calibration_residual", RF.response_calibration_residual, [
    *(((args[0], _U, _MU, _SIGMA), {}, error, "u") for args, error in _BAD_U),
    ((_U, None, _MU, _SIGMA), {}, TypeError, "shortcut"),
    ((_U, _u(1, 4, 3, 3), _MU, _SIGMA), {}, ValueError, "shortcut"),
    ((_U, _U, _MU, _SIGMA), {"relu": "yes"}, TypeError, "relu"),
    ((_U, _U, _MU, _SIGMA), {"eps": "1"}, TypeError, "eps"),
])  # fmt: skip
CASES += _rows("models.resnet20", resnet20, [
    ((), {"num_classes": "10"}, TypeError, "num_classes"),
    ((), {"num_classes": 0}, ValueError, "num_classes"),
    ((), {"se": "yes"}, TypeError, "se"),
    ((), {"se_reduction": 0}, ValueError, "se_reduction"),
])  # fmt: skip
CASES += _rows("models.resnet32", models.resnet32, [
    ((), {"widths": (16, 32)}, ValueError, "widths"),
    ((), {"widths": 16}, TypeError, "widths"),
])  # fmt: skip
CASES += _rows("models.resnet56", models.resnet56, [
    ((), {"calibrated": 1}, TypeError, "calibrated"),
    ((), {"reduction": 0}, ValueError, "reduction"),
])  # fmt: skip
CASES += _rows("models.CifarResNet", models.CifarResNet, [
    (("20",), {}, TypeError, "depth"),
    ((21,), {}, ValueError, "depth"),
    ((20,), {"in_chans": 0}, ValueError, "in_chans"),
    ((20,), {"widths": (16, 0, 64)}, ValueError, "widths"),
])  # fmt: skip
CASES += _rows("models.BasicBlock", models.BasicBlock, [
    ((16.0, 16), {}, TypeError, "in_channels"),
    ((16, 0), {}, ValueError, "out_channels"),
    ((16, 16, 0), {}, ValueError, "stride"),
    ((16, 16), {"se": None}, TypeError, "se"),
    ((16, 16), {"calibration": "rc"}, TypeError, "calibration"),
    ((16, 32), {"calibration": _RC(16)}, ValueError, "calibration"),  # 16 != 32 channels
    ((16, 16), {"se": True, "se_reduction": "4"}, TypeError, "se_reduction"),
])  # fmt: skip
CASES += _rows("models.SqueezeExcite", models.SqueezeExcite, [
    (("16",), {}, TypeError, "channels"),
    ((16, 0), {}, ValueError, "reduction"),
])  # fmt: skip
CASES += _rows("models.SqueezeExcite.forward", lambda se, x: se(x), [
    ((_u(2, 16, 4),), {}, ValueError, "x"),
    ((_u(2, 16, 4, 4, dtype=torch.int64),), {}, TypeError, "x"),
], make=lambda: models.SqueezeExcite(16))  # fmt: skip
CASES += _rows("set_compile", torch_recal.set_compile, [
    (("yes",), {}, TypeError, "enabled"),
    ((1,), {}, TypeError, "enabled"),
])  # fmt: skip
