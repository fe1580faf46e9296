"""Bad-call rows (tests/test_bad_calls.py): RifleScheduler, find_classifier, pinv_refit_dense,
NormalEquations, RandomLayerTraining.
"""

from __future__ import annotations

import torch
from torch import nn

from tests.badcalls import Bad
from tests.lstsq_data import OnePass
from torch_recal import (
    NormalEquations,
    RandomLayerTraining,
    RifleScheduler,
    find_classifier,
    pinv_refit_dense,
)

CASES: list[Bad] = []

# --------------------------------------------------------------------------- rifle, refit (S1)
_G = torch.Generator().manual_seed(0)
_H = torch.randn(64, 12, generator=_G, dtype=torch.float64)
_Y = torch.randint(0, 4, (64,), generator=_G)
_PAIRS = [(_H[i : i + 32], _Y[i : i + 32]) for i in range(0, 64, 32)]
_NAN = _H.clone()
_NAN[40, 3] = float("nan")
_OMIT = object()  # leave the keyword out


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.body(x)))


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight


class _Bare(nn.Module):  # a parameter of its own and no reset_parameters()
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(2, 2))


def _show(changes: dict) -> str:
    """A stable test id for keyword changes (no memory addresses)."""

    def one(v: object) -> str:
        if v is _OMIT:
            return "omitted"
        if isinstance(v, (int, float, str, type(None))):
            return repr(v)
        if isinstance(v, list):
            return "[" + ",".join(one(x) for x in v[:3]) + "]"
        return type(v).__name__

    return ",".join(f"{k}={one(v)}" for k, v in changes.items())


def _kw(base: dict, **changes: object) -> dict:
    return {k: v for k, v in {**base, **changes}.items() if v is not _OMIT}


def _rifle(error: type[BaseException], names: str, **changes: object) -> Bad:
    kwargs = _kw({"total_epochs": 10, "num_resets": 1}, **changes)
    return Bad(
        "RifleScheduler",
        lambda m: RifleScheduler(m, **kwargs),
        error,
        names,
        make=_Net,
        id=f"RifleScheduler-{names.strip('`=')}-{_show(changes)}",
    )


def _rifle_target(target: object, error: type[BaseException], names: str, id: str) -> Bad:
    return Bad(
        "RifleScheduler",
        lambda _: RifleScheduler(target, total_epochs=4, num_resets=1),
        error,
        names,
        make=lambda: target,
        id=f"RifleScheduler-target-{id}",
    )


def _stepped_rifle() -> RifleScheduler:
    rifle = RifleScheduler(_Net(), total_epochs=10, num_resets=2, seed=3)  # resets after 2, 5
    for _ in range(4):
        rifle.step()
    return rifle


def _rifle_state(error: type[BaseException], names: str, **changes: object) -> Bad:
    return Bad(
        "RifleScheduler.load_state_dict",
        lambda r: r.load_state_dict(_kw(r.state_dict(), **changes)),
        error,
        names,
        make=_stepped_rifle,
        id=f"RifleScheduler.load_state_dict-{_show(changes)}",
    )


def _refit(
    error: type[BaseException], names: str, loader: object = _PAIRS, id: str = "", **kw: object
) -> Bad:
    def make() -> nn.Module:
        torch.manual_seed(0)
        return nn.Linear(12, 4).double()

    return Bad(
        "pinv_refit_dense",
        lambda fc: pinv_refit_dense(fc, loader, **kw),
        error,
        names,
        make=make,
        id=f"pinv_refit_dense-{names.strip('`=')}-{id or _show(kw)}",
    )


def _accumulator() -> NormalEquations:
    acc = NormalEquations(12, 4)
    acc.update(_H, torch.nn.functional.one_hot(_Y, 4).double())
    return acc


def _normal(entry: str, call: object, error: type[BaseException], names: str, id: str) -> Bad:
    return Bad(
        f"NormalEquations{entry}",
        call,
        error,
        names,
        make=_accumulator,
        id=f"NormalEquations{entry}-{id}",
    )


def _ne_state(error: type[BaseException], names: str, id: str, **changes: object) -> Bad:
    return _normal(
        ".load_state_dict",
        lambda a: a.load_state_dict(_kw(a.state_dict(), **changes)),
        error,
        names,
        id,
    )


def _layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(2, 2) for _ in range(4)]


def _rlt(error: type[BaseException], names: str, layers: object = _OMIT, **kw: object) -> Bad:
    def call(ctx: list[nn.Module]) -> object:
        return RandomLayerTraining(ctx if layers is _OMIT else layers, **kw)

    return Bad(
        "RandomLayerTraining",
        call,
        error,
        names,
        make=_layers,
        id=f"RandomLayerTraining-{_show(kw) or _show({'layers': layers})}",
    )


def _stepped_rlt() -> tuple[RandomLayerTraining, nn.ModuleList]:
    layers = _layers()
    rlt = RandomLayerTraining(layers, seed=1, schedule=[1.0, 0.5, 0.25])
    rlt.step()
    return rlt, nn.ModuleList(layers)  # the layers' requires_grad must not change either


def _rlt_state(error: type[BaseException], names: str, **changes: object) -> Bad:
    return Bad(
        "RandomLayerTraining.load_state_dict",
        lambda c: c[0].load_state_dict(_kw(c[0].state_dict(), **changes)),
        error,
        names,
        make=_stepped_rlt,
        id=f"RandomLayerTraining.load_state_dict-{_show(changes)}",
    )


CASES += [
    # RifleScheduler(...)
    _rifle_target(None, TypeError, "`target`", "None"),
    _rifle_target("fc", TypeError, "`target`", "str"),
    _rifle_target([nn.Linear(2, 2), "fc"], TypeError, "`target`", "list-with-str"),
    _rifle_target([], ValueError, "`target`", "empty-list"),
    _rifle_target(nn.ReLU(), ValueError, "`target`", "no-parameters"),
    _rifle_target(_Tied(), ValueError, "`target`", "tied-to-embedding"),
    _rifle_target(nn.Sequential(nn.Linear(2, 2)), ValueError, "`model`", "no-head-found"),
    _rifle(TypeError, "`total_epochs`", total_epochs="8"),
    _rifle(TypeError, "`total_epochs`", total_epochs=True),
    _rifle(TypeError, "`total_epochs`", total_epochs=10.0),
    _rifle(ValueError, "`total_epochs`", total_epochs=0),
    _rifle(ValueError, "`total_epochs`", total_epochs=3, num_resets=3),
    _rifle(TypeError, "`num_resets`", num_resets="1"),
    _rifle(ValueError, "`num_resets`", num_resets=-1),
    _rifle(ValueError, "`num_resets`", num_resets=_OMIT),
    _rifle(ValueError, "`num_resets`", period=3),
    _rifle(TypeError, "`period`", num_resets=_OMIT, period="3"),
    _rifle(ValueError, "`period`", num_resets=_OMIT, period=0),
    _rifle(ValueError, "`period`", num_resets=_OMIT, period=6),
    _rifle(TypeError, "`unit`", unit=1),
    _rifle(ValueError, "`unit`", unit="epochs"),
    _rifle(TypeError, "`init`", init="kaiming"),
    _rifle(TypeError, "`optimizer`", optimizer=object()),
    _rifle(ValueError, "`optimizer`", optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters())),
    _rifle(TypeError, "`reset_optimizer_state`", reset_optimizer_state=1),
    _rifle(ValueError, "`optimizer=`", reset_optimizer_state=True),
    _rifle(TypeError, "`seed`", seed="0"),
    _rifle(ValueError, "`seed`", seed=-1),
    _rifle(TypeError, "`min_epochs_after_last`", min_epochs_after_last=2.0),
    _rifle(ValueError, "`min_epochs_after_last`", min_epochs_after_last=0),
    _rifle(ValueError, "`min_epochs_after_last`", min_epochs_after_last=6),
    _rifle_target(_Bare(), ValueError, "`init=`", "no-reset_parameters"),
    # RifleScheduler.head_lr_factor / load_state_dict
    Bad(
        "RifleScheduler.head_lr_factor",
        lambda r: r.head_lr_factor(-1),
        ValueError,
        "`epoch`",
        make=_stepped_rifle,
    ),
    Bad(
        "RifleScheduler.head_lr_factor",
        lambda r: r.head_lr_factor(2.0),
        TypeError,
        "`epoch`",
        make=_stepped_rifle,
    ),
    Bad(
        "RifleScheduler.load_state_dict",
        lambda r: r.load_state_dict(None),
        TypeError,
        "`state_dict`",
        make=_stepped_rifle,
    ),
    _rifle_state(ValueError, "`num_steps`", num_steps=10**9),
    _rifle_state(ValueError, "`num_steps`", num_steps=-1),
    _rifle_state(TypeError, "`num_steps`", num_steps="4"),
    _rifle_state(ValueError, "`last_reset`", num_steps=0, last_reset=3),
    _rifle_state(ValueError, "`last_reset`", last_reset=None),
    _rifle_state(TypeError, "`last_reset`", last_reset="2"),
    _rifle_state(ValueError, "`schedule`", schedule=[3, 6]),
    _rifle_state(TypeError, "`schedule`", schedule=5),
    _rifle_state(ValueError, "`total_epochs`", total_epochs=12),
    _rifle_state(ValueError, "`unit`", unit="step"),
    _rifle_state(ValueError, "`seed`", seed=None),
    _rifle_state(ValueError, "missing ['last_reset']", last_reset=_OMIT),
    _rifle_state(ValueError, "unexpected ['last_epoch']", last_epoch=3),
    # find_classifier
    Bad("find_classifier", lambda _: find_classifier(None), TypeError, "`model`"),
    Bad("find_classifier", lambda _: find_classifier("resnet"), TypeError, "`model`"),
    Bad(
        "find_classifier",
        lambda m: find_classifier(m),
        ValueError,
        "`model`",
        make=lambda: nn.Sequential(nn.Linear(2, 2)),
        id="find_classifier-no-head",
    ),
    # pinv_refit_dense
    Bad("pinv_refit_dense", lambda _: pinv_refit_dense(None, _PAIRS), TypeError, "`layer`"),
    Bad(
        "pinv_refit_dense",
        lambda c: pinv_refit_dense(c, _PAIRS),
        TypeError,
        "`layer`",
        make=lambda: nn.Conv2d(1, 1, 1),
        id="pinv_refit_dense-layer-conv",
    ),
    Bad(
        "pinv_refit_dense",
        lambda c: pinv_refit_dense(c, _PAIRS),
        ValueError,
        "`layer`",
        make=lambda: nn.Sequential(nn.Linear(12, 3), nn.Linear(4, 2)),
        id="pinv_refit_dense-layer-widths",
    ),
    _refit(TypeError, "`loader`", None, id="None"),
    _refit(TypeError, "`loader`", 5, id="int"),
    _refit(ValueError, "`loader`", [], id="empty"),
    _refit(ValueError, "`loader`", OnePass(_PAIRS), id="empty-on-second-pass"),
    _refit(TypeError, "`batch_fn=`", [(_H, _Y, _Y)], id="3-tuples"),
    _refit(TypeError, "`batch_fn=`", [{"x": _H, "y": _Y}], id="dicts"),
    _refit(TypeError, "`batch_fn=`", [_H], id="tensors"),
    _refit(TypeError, "`batch_fn`", _PAIRS, id="str", batch_fn="first"),
    _refit(TypeError, "`batch_fn`", _PAIRS, id="returns-one", batch_fn=lambda b: b[0]),
    _refit(ValueError, "`loader`", [(_NAN[:32], _Y[:32]), (_NAN[32:], _Y[32:])], id="nan"),
    _refit(ValueError, "`loader`", [(_H[:, :10], _Y)], id="width"),
    _refit(TypeError, "`loader`", [(_H.long(), _Y)], id="int-features"),
    _refit(ValueError, "`loader`", [(_H, _Y + 4)], id="label-range"),
    _refit(TypeError, "`loader`", [(_H, _Y.double())], id="float-labels"),
    _refit(ValueError, "`loader`", [(_H, _Y[:10])], id="label-rows"),
    _refit(TypeError, "`loader`", [(_H, [1, 2])], id="list-labels"),
    _refit(ValueError, "`loader`", [(_H, _Y.double())], id="raw-1d", targets="raw"),
    _refit(TypeError, "`model`", model="net"),
    _refit(TypeError, "`ridge`", ridge="1"),
    _refit(ValueError, "`ridge`", ridge=-1.0),
    _refit(ValueError, "`ridge`", ridge=float("nan")),
    _refit(TypeError, "`targets`", targets=1),
    _refit(ValueError, "`targets`", targets="soft"),
    _refit(TypeError, "`num_classes`", num_classes="3"),
    _refit(ValueError, "`num_classes`", num_classes=5),
    _refit(ValueError, "`num_classes`", num_classes=0),
    _refit(TypeError, "`inverse_activation`", inverse_activation=5),
    _refit(ValueError, "`inverse_activation`", inverse_activation="softmax"),
    _refit(ValueError, "`inverse_activation`", inverse_activation=nn.Softmax(1)),
    _refit(TypeError, "`step_size`", step_size="0.5"),
    _refit(ValueError, "`step_size`", step_size=0.0),
    _refit(ValueError, "`step_size`", step_size=1.5),
    _refit(TypeError, "`start`", start=None),
    _refit(ValueError, "`start`", start="random"),
    _refit(TypeError, "`evaluate`", evaluate=1),
    _refit(TypeError, "`assign`", assign="yes"),
    _refit(TypeError, "`progress`", progress=None),
    _refit(TypeError, "`device`", device=0.5),
    _refit(ValueError, "`device`", device="gpu"),
    Bad(
        "pinv_refit_dense",
        lambda c: pinv_refit_dense(c[1], [(torch.randn(4, 6), _Y[:4])], model=c[0]),
        ValueError,
        "`layer`",
        make=lambda: (_Net(), nn.Linear(8, 3)),
        id="pinv_refit_dense-layer-not-in-model",
    ),
    # NormalEquations(...) and its methods
    Bad("NormalEquations", lambda _: NormalEquations("3", 2), TypeError, "`num_features`"),
    Bad("NormalEquations", lambda _: NormalEquations(0, 2), ValueError, "`num_features`"),
    Bad("NormalEquations", lambda _: NormalEquations(3, True), TypeError, "`num_outputs`"),
    Bad("NormalEquations", lambda _: NormalEquations(3, 0), ValueError, "`num_outputs`"),
    Bad(
        "NormalEquations",
        lambda _: NormalEquations(3, 2, fit_intercept=1),
        TypeError,
        "`fit_intercept`",
    ),
    Bad("NormalEquations", lambda _: NormalEquations(3, 2, device=1.0), TypeError, "`device`"),
    Bad("NormalEquations", lambda _: NormalEquations(3, 2, device="gpu"), ValueError, "`device`"),
    _normal(".update", lambda a: a.update(_H.tolist(), _H[:, :4]), TypeError, "`h`", "list"),
    _normal(".update", lambda a: a.update(_H, None), TypeError, "`t`", "None"),
    _normal(
        ".update",
        lambda a: a.update(_H.to(torch.complex128), _H[:, :4]),
        TypeError,
        "`h`",
        "complex",
    ),
    _normal(".update", lambda a: a.update(_H[:, :5], _H[:, :4]), ValueError, "`h`", "width"),
    _normal(".update", lambda a: a.update(_H, _H[:10, :4]), ValueError, "`t`", "rows"),
    _normal(".update", lambda a: a.update(_NAN, _H[:, :4]), ValueError, "`h`", "nan"),
    _normal(".merge", lambda a: a.merge("x"), TypeError, "`other`", "str"),
    _normal(".merge", lambda a: a.merge(NormalEquations(12, 3)), ValueError, "`other`", "sizes"),
    _normal(".solve", lambda a: a.solve("1"), TypeError, "`ridge`", "str"),
    _normal(".solve", lambda a: a.solve(-1.0), ValueError, "`ridge`", "negative"),
    _normal(".solve", lambda a: a.solve(start=[[0.0]]), TypeError, "`start`", "list"),
    _normal(".solve", lambda a: a.solve(start=torch.zeros(4, 11)), ValueError, "`start`", "shape"),
    _normal(
        ".solve",
        lambda a: a.solve(start_bias=torch.zeros(4)),
        ValueError,
        "`start_bias`",
        "without-start",
    ),
    Bad(
        "NormalEquations.solve",
        lambda a: a.solve(),
        ValueError,
        "no samples",
        make=lambda: NormalEquations(3, 2),
    ),
    _normal(
        ".residual_sum_of_squares",
        lambda a: a.residual_sum_of_squares(torch.zeros(3)),
        ValueError,
        "`weight`",
        "shape",
    ),
    Bad(
        "NormalEquations.residual_sum_of_squares",
        lambda a: a.residual_sum_of_squares(torch.zeros(2, 3), torch.zeros(2)),
        ValueError,
        "`bias`",
        make=lambda: NormalEquations(3, 2, fit_intercept=False),
    ),
    _normal(".load_state_dict", lambda a: a.load_state_dict([]), TypeError, "`state_dict`", "list"),
    _ne_state(ValueError, "`mean_h`", "mean_h-shape-1", mean_h=torch.zeros(1, dtype=torch.float64)),
    _ne_state(ValueError, "`s_hh`", "s_hh-shape-3", s_hh=torch.zeros(3, dtype=torch.float64)),
    _ne_state(ValueError, "`count`", "count-negative", count=-5),
    _ne_state(TypeError, "`count`", "count-float", count=64.0),
    _ne_state(
        ValueError,
        "`s_hh`",
        "s_hh-nan",
        s_hh=torch.full((12, 12), float("nan"), dtype=torch.float64),
    ),
    _ne_state(ValueError, "missing ['s_hh']", "s_hh-missing", s_hh=_OMIT),
    _ne_state(TypeError, "`s_ht`", "s_ht-int", s_ht=torch.zeros(12, 4, dtype=torch.int64)),
    _ne_state(TypeError, "`s_tt`", "s_tt-list", s_tt=[0.0] * 4),
    _ne_state(ValueError, "`count`", "count-zero-with-statistics", count=0),
    _ne_state(
        ValueError,
        "`s_hh`",
        "s_hh-asymmetric",
        s_hh=torch.triu(torch.ones(12, 12, dtype=torch.float64)),
    ),
    _ne_state(ValueError, "`s_tt`", "s_tt-negative", s_tt=-torch.ones(4, dtype=torch.float64)),
    _ne_state(ValueError, "`num_features`", "other-size", num_features=11),
    _ne_state(TypeError, "`fit_intercept`", "fit_intercept-int", fit_intercept=1),
    # RandomLayerTraining(...), .choice, .load_state_dict
    _rlt(TypeError, "`layers`", layers=None),
    _rlt(TypeError, "`layers`", layers=nn.Linear(2, 2)),
    _rlt(TypeError, "`layers`", layers=[nn.Linear(2, 2), "conv"]),
    _rlt(ValueError, "`layers`", layers=[]),
    _rlt(TypeError, "`min_trainable`", min_trainable="1"),
    _rlt(ValueError, "`min_trainable`", min_trainable=10),
    _rlt(ValueError, "`min_trainable`", min_trainable=-1),
    _rlt(TypeError, "`seed`", seed="1"),
    _rlt(ValueError, "`seed`", seed=-1),
    _rlt(TypeError, "`schedule`", schedule="1, .5"),
    _rlt(TypeError, "`schedule`", schedule=0.5),
    _rlt(TypeError, "`schedule", schedule=[None]),
    _rlt(ValueError, "`schedule", schedule=[5.0]),
    _rlt(ValueError, "`schedule", schedule=[float("nan")]),
    _rlt(ValueError, "`schedule`", schedule=[]),
    Bad(
        "RandomLayerTraining.choice",
        lambda c: c[0].choice(-1),
        ValueError,
        "`epoch`",
        make=_stepped_rlt,
    ),
    Bad(
        "RandomLayerTraining.choice",
        lambda c: c[0].choice("1"),
        TypeError,
        "`epoch`",
        make=_stepped_rlt,
    ),
    _rlt_state(ValueError, "`schedule[0]`", schedule=[5.0]),
    _rlt_state(ValueError, "`schedule`", schedule=[1.0, 0.5]),
    _rlt_state(ValueError, "`min_trainable`", min_trainable=10),
    _rlt_state(ValueError, "`seed`", seed=2),
    _rlt_state(TypeError, "`seed`", seed="x"),
    _rlt_state(TypeError, "`num_steps`", num_steps="x"),
    _rlt_state(ValueError, "`num_steps`", num_steps=-1),
    _rlt_state(ValueError, "unexpected ['epoch']", epoch=1),
    _rlt_state(ValueError, "missing ['num_steps']", num_steps=_OMIT),
]
