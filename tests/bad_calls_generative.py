"""Bad-call rows (tests/test_bad_calls.py): GenerativeGradientLoss, ReferenceDecoder,
first_layer_filter_stats, functional.gradient_discrepancy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import torch_recal
from tests.badcalls import Bad
from torch_recal.functional import gradient_discrepancy

CASES: list[Bad] = []

# --- generative (S2b): GenerativeGradientLoss, ReferenceDecoder, first_layer_filter_stats,
# functional.gradient_discrepancy


def _ggr_world(ema: float | None = 0.9) -> tuple[Any, nn.Module, torch.Tensor, torch.Tensor]:
    """(a GGR with a decoder reference after one applied call, its model, x, y)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 5 * 5, 3)
    )
    decoder = torch_recal.ReferenceDecoder.for_layer(model[0])
    ggr = torch_recal.GenerativeGradientLoss(model[0].weight, decoder, ema=ema)
    x, y = torch.randn(4, 1, 5, 5), torch.tensor([0, 1, 2, 0])
    ggr(F.cross_entropy(model(x), y), x)  # an average to protect
    return ggr, model, x, y


def _ce(c: Any) -> torch.Tensor:
    return F.cross_entropy(c[1](c[2]), c[3])


def _no_ema() -> Any:
    return _ggr_world(ema=None)


def _conv() -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(1, 2, 3, padding=1)


def _ggr(conv: nn.Conv2d, reference: Any = None, **kwargs: Any) -> Any:
    ref = torch.zeros(conv.weight.shape) if reference is None else reference
    return torch_recal.GenerativeGradientLoss(conv.weight, ref, **kwargs)


def _decoder() -> Any:
    return torch_recal.ReferenceDecoder.for_layer(_conv())


def _rd(*args: Any, **kwargs: Any) -> Any:
    return torch_recal.ReferenceDecoder(*args, **kwargs)


def _images(n: int = 2, c: int = 1) -> torch.Tensor:
    return torch.rand(n, c, 6, 6, generator=torch.Generator().manual_seed(n))


def _load(c: Any, **changes: Any) -> None:
    c[0].load_state_dict({**c[0].state_dict(), **changes})


def _other_optimizer() -> torch.optim.Optimizer:
    return torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)


_G, _GC = "GenerativeGradientLoss", "GenerativeGradientLoss.__call__"
_GL = "GenerativeGradientLoss.load_state_dict"
_RD, _FL, _FIT = "ReferenceDecoder", "ReferenceDecoder.for_layer", "ReferenceDecoder.fit"
_GRAD, _STATS = "ReferenceDecoder.gradient", "first_layer_filter_stats"
_DISC = "functional.gradient_discrepancy"
_NAN_FLOAT = float("nan")

# fmt: off
CASES += [
    # constructor (the conv whose weight is the target is unchanged after the error)
    Bad(_G, lambda c: _ggr(c, weight=-1.0), ValueError, "`weight`", _conv),
    Bad(_G, lambda c: _ggr(c, weight="1"), TypeError, "`weight`", _conv),
    Bad(_G, lambda c: _ggr(c, weight=True), TypeError, "`weight`", _conv, id="weight-bool"),
    Bad(_G, lambda c: _ggr(c, weight=_NAN_FLOAT), ValueError, "`weight`", _conv, id="weight-nan"),
    Bad(_G, lambda c: _ggr(c, ema=1.0), ValueError, "`ema`", _conv),
    Bad(_G, lambda c: _ggr(c, ema="0.9"), TypeError, "`ema`", _conv),
    Bad(_G, lambda c: _ggr(c, every=0), ValueError, "`every`", _conv),
    Bad(_G, lambda c: _ggr(c, every=1.5), TypeError, "`every`", _conv),
    Bad(_G, lambda c: _ggr(c, eps=0.0), ValueError, "`eps`", _conv),
    Bad(_G, lambda c: _ggr(c, eps="1e-12"), TypeError, "`eps`", _conv),
    Bad(_G, lambda c: _ggr(c, discrepancy="kl"), ValueError, "`discrepancy`", _conv),
    Bad(_G, lambda c: _ggr(c, discrepancy=1), TypeError, "`discrepancy`", _conv),
    Bad(_G, lambda c: _ggr(c, sync=1), TypeError, "`sync`", _conv),
    Bad(_G, lambda c: _ggr(c, fused_double_backward="y"), TypeError, "`fused_double_backward`",
        _conv),
    Bad(_G, lambda c: _ggr(c, 3.0), TypeError, "`reference`", _conv),
    Bad(_G, lambda c: _ggr(c, torch.zeros(2, 1, 5, 5)), ValueError, "`reference`", _conv,
        id="reference-shape"),
    Bad(_G, lambda c: _ggr(c, torch.full((2, 1, 3, 3), _NAN_FLOAT)), ValueError, "`reference`",
        _conv, id="reference-nan"),
    Bad(_G, lambda c: _ggr(c, torch.zeros(2, 1, 3, 3).long()), TypeError, "`reference`", _conv,
        id="reference-int"),
    Bad(_G, lambda c: _ggr(c, _rd(1, 3, 3)), ValueError, "`reference`", _conv,
        id="reference-decoder-shape"),
    Bad(_G, lambda c: torch_recal.GenerativeGradientLoss(c, torch.zeros(1)), TypeError,
        "`target`", _conv, id="target-module"),
    Bad(_G, lambda c: torch_recal.GenerativeGradientLoss(c.weight * 2, torch.zeros(2, 1, 3, 3)),
        ValueError, "`target`", _conv, id="target-non-leaf"),
    Bad(_G, lambda c: torch_recal.GenerativeGradientLoss(torch.zeros(2).long(), torch.zeros(2)),
        TypeError, "`target`", id="target-int"),
    # options set between steps
    Bad(_G, lambda c: setattr(c[0], "every", 0), ValueError, "`every`", _ggr_world,
        id="set-every"),
    Bad(_G, lambda c: setattr(c[0], "weight", -1.0), ValueError, "`weight`", _ggr_world,
        id="set-weight"),
    Bad(_G, lambda c: setattr(c[0], "ema", "0.5"), TypeError, "`ema`", _ggr_world,
        id="set-ema"),
    Bad(_G, lambda c: setattr(c[0], "discrepancy", "L2"), ValueError, "`discrepancy`",
        _ggr_world, id="set-discrepancy"),
    Bad(_G, lambda c: setattr(c[0], "step", 3), AttributeError, "step", _ggr_world,
        id="set-deprecated-step"),
    # calls
    Bad(_GC, lambda c: c[0]([1.0], c[2]), TypeError, "`task_loss`", _ggr_world),
    Bad(_GC, lambda c: c[0](_ce(c).expand(2), c[2]), ValueError, "`task_loss`", _ggr_world,
        id="call-vector-loss"),
    Bad(_GC, lambda c: c[0](_ce(c).detach(), c[2]), ValueError, "`task_loss`", _ggr_world,
        id="call-detached-loss"),
    Bad(_GC, lambda c: c[0](_ce(c)), TypeError, "`x`", _ggr_world, id="call-no-x"),
    Bad(_GC, lambda c: c[0](_ce(c), c[2].tolist()), TypeError, "`x`", _ggr_world,
        id="call-x-list"),
    Bad(_GC, lambda c: c[0](_ce(c), c[2][:0]), ValueError, "`x`", _ggr_world,
        id="call-x-empty"),
    Bad(_GC, lambda c: c[0](_ce(c), c[2].expand(4, 2, 5, 5)), ValueError, "`x`", _ggr_world,
        id="call-x-channels"),
    Bad(_GC, lambda c: c[0](_ce(c), c[2], scaler=65536.0), TypeError, "`scaler`", _ggr_world),
    Bad(_GC, lambda c: c[0]((c[2] * nn.Parameter(torch.ones(()))).sum(), c[2]), ValueError,
        "`target`", _ggr_world, id="call-loss-without-target"),
    # load_state_dict
    Bad(_GL, lambda c: c[0].load_state_dict({"step": 7}), ValueError, "'step'", _ggr_world,
        id="state-old-key"),
    Bad(_GL, lambda c: c[0].load_state_dict(None), TypeError, "`state_dict`", _ggr_world),
    Bad(_GL, lambda c: c[0].load_state_dict({"num_steps": 1, "num_ema_updates": 1}),
        ValueError, "reference_ema", _ggr_world, id="state-partial"),
    Bad(_GL, lambda c: _load(c, num_steps=-1), ValueError, "`num_steps`", _ggr_world),
    Bad(_GL, lambda c: _load(c, num_steps="1"), TypeError, "`num_steps`", _ggr_world),
    Bad(_GL, lambda c: _load(c, num_ema_updates=2), ValueError, "`num_ema_updates`",
        _ggr_world),
    Bad(_GL, lambda c: _load(c, reference_ema=torch.full((2, 1, 3, 3), _NAN_FLOAT)), ValueError,
        "`reference_ema`", _ggr_world, id="state-nan"),
    Bad(_GL, lambda c: _load(c, reference_ema=torch.zeros(3)), ValueError, "`reference_ema`",
        _ggr_world, id="state-shape"),
    Bad(_GL, lambda c: _load(c, reference_ema=None), ValueError, "`reference_ema`", _ggr_world,
        id="state-none"),
    Bad(_GL, lambda c: _load(c, num_ema_updates=1, reference_ema=torch.zeros(2, 1, 3, 3)),
        ValueError, "ema=None", _no_ema, id="state-ema-none"),
    # ReferenceDecoder
    Bad(_RD, lambda c: _rd(0, 4, 3), ValueError, "`in_channels`"),
    Bad(_RD, lambda c: _rd("1", 4, 3), TypeError, "`in_channels`"),
    Bad(_RD, lambda c: _rd(1, 0, 3), ValueError, "`out_channels`"),
    Bad(_RD, lambda c: _rd(1, 4, 0), ValueError, "`kernel_size`"),
    Bad(_RD, lambda c: _rd(1, 4, (3, 3, 3)), ValueError, "`kernel_size`", id="kernel-triple"),
    Bad(_RD, lambda c: _rd(1, 4, 3.0), TypeError, "`kernel_size`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, stride=0), ValueError, "`stride`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, padding=-1), ValueError, "`padding`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, padding="same"), TypeError, "`padding`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, dilation=(1, 0)), ValueError, "`dilation`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, hidden=0), ValueError, "`hidden`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, loss="bce"), ValueError, "`loss`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, loss=None), TypeError, "`loss`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, dtype=torch.int64), ValueError, "`dtype`"),
    Bad(_RD, lambda c: _rd(1, 4, 3, dtype="float32"), TypeError, "`dtype`"),
    Bad(_RD, lambda c: c(_images()[0]), ValueError, "`x`", _decoder, id="forward-3d"),
    Bad(_FL, lambda c: torch_recal.ReferenceDecoder.for_layer(nn.Linear(3, 3)), TypeError,
        "`conv`"),
    Bad(_FL, lambda c: torch_recal.ReferenceDecoder.for_layer(None), TypeError, "`conv`",
        id="for_layer-none"),
    Bad(_FL, lambda c: torch_recal.ReferenceDecoder.for_layer(nn.Conv2d(2, 2, 3, groups=2)),
        ValueError, "`conv`", id="for_layer-groups"),
    Bad(_FL, lambda c: torch_recal.ReferenceDecoder.for_layer(nn.Conv2d(1, 2, 3, padding="same")),
        ValueError, "`conv`", id="for_layer-padding-same"),
    Bad(_FL, lambda c: torch_recal.ReferenceDecoder.for_layer(c, hidden=0), ValueError,
        "`hidden`", _conv),
    Bad(_FIT, lambda c: c.fit(None), TypeError, "`loader`", _decoder),
    Bad(_FIT, lambda c: c.fit(_images()), TypeError, "`loader`", _decoder, id="fit-tensor"),
    Bad(_FIT, lambda c: c.fit((x for x in [_images()]), epochs=2), ValueError, "`loader`",
        _decoder, id="fit-generator-2-epochs"),
    Bad(_FIT, lambda c: c.fit([]), ValueError, "`loader`", _decoder, id="fit-empty"),
    Bad(_FIT, lambda c: c.fit([_images(), _images(0)]), ValueError, "`loader`", _decoder,
        id="fit-zero-size-batch"),
    Bad(_FIT, lambda c: c.fit([_images(), _images(2, 3)]), ValueError, "`loader`", _decoder,
        id="fit-bad-second-batch"),
    Bad(_FIT, lambda c: c.fit([(_images(), 0, 0)]), ValueError, "`batch_fn=`", _decoder,
        id="fit-3-tuples"),
    Bad(_FIT, lambda c: c.fit([{"x": _images()}]), TypeError, "`batch_fn=`", _decoder,
        id="fit-dicts"),
    Bad(_FIT, lambda c: c.fit([{"x": _images()}], batch_fn=lambda b: b["x"][0]), ValueError,
        "`batch_fn`", _decoder, id="fit-batch_fn-shape"),
    Bad(_FIT, lambda c: c.fit([_images()], batch_fn=5), TypeError, "`batch_fn`", _decoder),
    Bad(_FIT, lambda c: c.fit([_images()], epochs=0), ValueError, "`epochs`", _decoder),
    Bad(_FIT, lambda c: c.fit([_images()], epochs="1"), TypeError, "`epochs`", _decoder),
    Bad(_FIT, lambda c: c.fit([_images()], lr=0.0), ValueError, "`lr`", _decoder),
    Bad(_FIT, lambda c: c.fit([_images()], lr="1e-3"), TypeError, "`lr`", _decoder),
    Bad(_FIT, lambda c: c.fit([_images()], optimizer="adam"), TypeError, "`optimizer`",
        _decoder),
    Bad(_FIT, lambda c: c.fit([_images()], optimizer=_other_optimizer()), ValueError,
        "`optimizer`", _decoder, id="fit-foreign-optimizer"),
    Bad(_FIT, lambda c: c.fit([_images()], progress=1), TypeError, "`progress`", _decoder),
    Bad(_GRAD, lambda c: c.gradient(_images().tolist()), TypeError, "`x`", _decoder),
    Bad(_GRAD, lambda c: c.gradient(_images(0)), ValueError, "`x`", _decoder,
        id="gradient-zero-size"),
    Bad(_GRAD, lambda c: c.gradient(_images(2, 3)), ValueError, "`x`", _decoder,
        id="gradient-channels"),
    Bad(_GRAD, lambda c: c.gradient(_images().long()), TypeError, "`x`", _decoder,
        id="gradient-int"),
    # first_layer_filter_stats
    Bad(_STATS, lambda c: torch_recal.first_layer_filter_stats([1, 2]), TypeError, "`layer`"),
    Bad(_STATS, lambda c: torch_recal.first_layer_filter_stats(None), TypeError, "`layer`",
        id="stats-none"),
    Bad(_STATS, lambda c: torch_recal.first_layer_filter_stats(nn.Linear(2, 2)), ValueError,
        "`layer`", id="stats-no-conv"),
    Bad(_STATS, lambda c: torch_recal.first_layer_filter_stats(torch.zeros(3)), ValueError,
        "`layer`", id="stats-1d"),
    # functional.gradient_discrepancy
    Bad(_DISC, lambda c: gradient_discrepancy([1.0], torch.ones(1)), TypeError, "`grad`"),
    Bad(_DISC, lambda c: gradient_discrepancy(torch.ones(2), torch.ones(2).long()), TypeError,
        "`reference`"),
    Bad(_DISC, lambda c: gradient_discrepancy(torch.ones(2), torch.ones(3)), ValueError,
        "`reference`"),
    Bad(_DISC, lambda c: gradient_discrepancy(torch.ones(0), torch.ones(0)), ValueError,
        "`grad`"),
    Bad(_DISC, lambda c: gradient_discrepancy(torch.ones(2), torch.ones(2), "cos"), ValueError,
        "`kind`"),
    Bad(_DISC, lambda c: gradient_discrepancy(torch.ones(2), torch.ones(2), 1), TypeError,
        "`kind`"),
    Bad(_DISC, lambda c: gradient_discrepancy(torch.ones(2), torch.ones(2), eps=0.0),
        ValueError, "`eps`"),
]
# fmt: on
