"""Bad-call rows (tests/test_bad_calls.py): CoherentStrongReg (constructor, step, after_step,
attach, load_state_dict), compression_report, the coherence functional forms.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.badcalls import Bad
from torch_recal import CoherentStrongReg, DescentGate, compression_report
from torch_recal.functional import coherence_statistics, group_soft_threshold_, soft_threshold_

CASES: list[Bad] = []
_REG = "CoherentStrongReg"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))


def _new(model: nn.Module, **kw: Any) -> CoherentStrongReg:
    return CoherentStrongReg(model.named_parameters(), **{"strength": 0.1, "lr": 0.1, **kw})


def _ctor(error: type[BaseException], names: str, **kw: Any) -> Bad:
    shown = ",".join(f"{k}={v!r}" for k, v in kw.items())
    return Bad(_REG, lambda m: _new(m, **kw), error, names, _model, id=f"{_REG}-{shown}")


CASES += [
    _ctor(TypeError, "`kind`", kind=1),
    _ctor(ValueError, "`kind`", kind="l3"),
    _ctor(TypeError, "`strength`", strength="0.1"),
    _ctor(ValueError, "`strength`", strength=-0.1),
    _ctor(ValueError, "`strength`", strength=float("nan")),
    _ctor(ValueError, "`l1_mode`", l1_mode="clip"),
    _ctor(ValueError, "`criterion`", criterion="coherent"),
    _ctor(TypeError, "`criterion`", criterion=1),
    _ctor(ValueError, "`max_undo`", max_undo=0.0),
    _ctor(ValueError, "`resume_undo`", resume_undo=0.9),  # above max_undo
    _ctor(ValueError, "`smoothing`", smoothing=1.0),
    _ctor(ValueError, "`warmup`", warmup="later"),
    _ctor(ValueError, "`warmup`", warmup=-1),
    _ctor(TypeError, "`warmup`", warmup=1.5),
    _ctor(ValueError, "`takeoff`", takeoff=1.0),
    _ctor(ValueError, "`max_ratio`", criterion="ratio", max_ratio=0.0),
    _ctor(ValueError, "`min_cosine`", criterion="ratio", min_cosine=2.0),
    _ctor(ValueError, "`window`", criterion="ratio", window=0),
    _ctor(TypeError, "`reactivate`", criterion="ratio", reactivate="no"),
    _ctor(TypeError, "`max_ratio`", max_ratio=2.0),  # an option of RatioRule, not of descent
    _ctor(TypeError, "`max_undo`", criterion=DescentGate(), max_undo=0.3),  # beside an object
    _ctor(TypeError, "`unknown`", unknown=1),
    _ctor(TypeError, "`strength`", strength=None),  # required without a budget
    _ctor(ValueError, "`group`", group="row"),
    _ctor(ValueError, "`group`", group="unit", l1_mode="subgradient"),
    _ctor(ValueError, "`total_steps`", total_steps=100),  # only with a budget
    _ctor(ValueError, "`delay`", delay=-1),
    _ctor(TypeError, "`freeze_below`", freeze_below="0.1"),
    _ctor(ValueError, "`freeze_below`", freeze_below=1.0),
    _ctor(ValueError, "`freeze_below`", freeze_below=0.0),
    _ctor(ValueError, "`lr`", lr=-1.0),
    _ctor(TypeError, "`optimizer`", optimizer="sgd"),
    _ctor(TypeError, "`scaler`", scaler=object()),
    _ctor(TypeError, "`weights_only`", weights_only=1),
    _ctor(ValueError, "`history_size`", history_size=-1),
    Bad(_REG, lambda m: CoherentStrongReg(None, strength=0.1), TypeError, "`params`", _model),  # type: ignore[arg-type]
    Bad(
        _REG, lambda m: CoherentStrongReg(m[0].weight, strength=0.1), TypeError, "`params`", _model
    ),
    Bad(_REG, lambda m: CoherentStrongReg([1, 2], strength=0.1), TypeError, "`params`", _model),
    Bad(
        _REG,
        lambda m: CoherentStrongReg([("b", m[0].bias)], strength=0.1),
        ValueError,
        "`params`",
        _model,
        id=f"{_REG}-only-biases",
    ),
    Bad(
        _REG,
        lambda m: CoherentStrongReg(
            [nn.Parameter(torch.ones(2, 2, dtype=torch.long), requires_grad=False)], strength=0.1
        ),
        TypeError,
        "`params`",
        _model,
        id=f"{_REG}-int-params",
    ),
]


# ----------------------------------------------------------------- step / after_step / attach
def _with_grads(**kw: Any) -> tuple[CoherentStrongReg, nn.Module, torch.optim.Optimizer]:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    reg = CoherentStrongReg(model.named_parameters(), strength=0.1, optimizer=opt, **kw)
    model(torch.randn(5, 4)).square().mean().backward()
    return reg, model, opt


def _stepped(**kw: Any) -> tuple[CoherentStrongReg, nn.Module, torch.optim.Optimizer]:
    reg, model, opt = _with_grads(warmup=0, **kw)
    reg.step()
    return reg, model, opt


def _no_lr() -> tuple[CoherentStrongReg, nn.Module]:
    model = _model()
    model(torch.randn(5, 4)).sum().backward()
    return CoherentStrongReg(model.named_parameters(), strength=0.1), model


def _missing_grad() -> tuple[CoherentStrongReg, nn.Module]:
    model = _model()
    reg = _new(model)
    model[2].weight.grad = torch.ones(2, 6)  # 0.weight has no .grad
    return reg, model


def _attached() -> tuple[CoherentStrongReg, nn.Module, torch.optim.Optimizer]:
    reg, model, opt = _with_grads()
    reg.attach()
    return reg, model, opt


CASES += [
    Bad(
        f"{_REG}.step", lambda c: c[0].step(), RuntimeError, "after_step", _stepped, id="step-twice"
    ),
    Bad(
        f"{_REG}.step",
        lambda c: c[0].step(),
        RuntimeError,
        "`0.weight`".strip("`"),
        _missing_grad,
        id="step-missing-grad",
    ),
    Bad(f"{_REG}.step", lambda c: c[0].step(), RuntimeError, "`lr=`", _no_lr, id="step-prox-no-lr"),
    Bad(
        f"{_REG}.after_step",
        lambda c: c[0].after_step(),
        RuntimeError,
        "without step",
        _with_grads,
        id="after-step-first",
    ),
    Bad(
        f"{_REG}.attach",
        lambda c: c[0].attach("sgd"),
        TypeError,
        "`optimizer`",
        _with_grads,
        id="attach-str",
    ),
    Bad(
        f"{_REG}.attach",
        lambda c: c[0].attach(torch.optim.SGD(c[1].parameters(), lr=0.1)),
        ValueError,
        "`optimizer`",
        _with_grads,
        id="attach-other",
    ),
    Bad(
        f"{_REG}.attach",
        lambda c: c[0].attach(),
        RuntimeError,
        "already attached",
        _attached,
        id="attach-twice",
    ),
    Bad(
        f"{_REG}.attach",
        lambda c: c[0].attach(),
        ValueError,
        "`optimizer`",
        _no_lr,
        id="attach-no-optimizer",
    ),
]


# ----------------------------------------------------------------- load_state_dict
def _stepped_state() -> tuple[CoherentStrongReg, nn.Module, torch.optim.Optimizer]:
    reg, model, opt = _stepped(criterion=DescentGate())  # the gate's state: all fields set
    opt.step()
    reg.after_step()
    return reg, model, opt


def _load(error: type[BaseException], names: str, **changes: Any) -> Bad:
    def call(c: Any) -> None:
        c[0].load_state_dict({**c[0].state_dict(), **changes})

    shown = ",".join(f"{k}={v!r}" for k, v in changes.items())
    return Bad(f"{_REG}.load_state_dict", call, error, names, _stepped_state, id=f"load-{shown}")


CASES += [
    _load(TypeError, "`is_active`", is_active="no"),
    _load(TypeError, "`num_steps`", num_steps=1.5),
    _load(ValueError, "`num_steps`", num_steps=-5),
    _load(ValueError, "`num_skipped`", num_skipped=7),  # more than num_steps
    _load(ValueError, "`cost_ema`", cost_ema=float("nan")),
    _load(ValueError, "`cost_ema`", progress_ema=0.1),  # cost_ema is not set
    _load(ValueError, "`measured_step`", measured_step=None),  # last_step holds a change
    _load(ValueError, "`last_step`", last_step=[torch.zeros(3)]),  # one tensor per weight
    _load(ValueError, "`ramp_start`", ramp_start=3),  # warmup=0 fixes it at delay
    _load(ValueError, "`frozen_at`", frozen_at=99),  # a step not taken yet
    _load(ValueError, "`is_active`", frozen_at=0, is_active=True),  # frozen means off
    _load(ValueError, "`peak_lr`", peak_lr=0.0),
    _load(ValueError, "`state_dict`", history=[]),
    _load(ValueError, "`criterion`", criterion="always"),  # saved with the gate
    _load(TypeError, "`criterion`", criterion=1),
    Bad(
        f"{_REG}.load_state_dict",
        lambda c: c[0].load_state_dict([]),
        TypeError,
        "`state_dict`",
        _stepped_state,
        id="load-list",
    ),
    Bad(
        f"{_REG}.load_state_dict",
        lambda c: c[0].load_state_dict({"num_steps": 3}),
        ValueError,
        "missing",
        _stepped_state,
        id="load-partial",
    ),
]


# ----------------------------------------------------------------- compression_report
def _nan_model() -> nn.Module:
    model = _model()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    return model


_CR = "compression_report"
CASES += [
    Bad(_CR, lambda m: compression_report(None), TypeError, "`model`", _model),  # type: ignore[arg-type]
    Bad(
        _CR, lambda m: compression_report(m[0].weight), TypeError, "`model`", _model, id="cr-tensor"
    ),
    Bad(_CR, lambda m: compression_report([1, 2]), TypeError, "`model`", _model, id="cr-ints"),
    Bad(_CR, lambda m: compression_report(m, threshold=-1.0), ValueError, "`threshold`", _model),
    Bad(_CR, lambda m: compression_report(m, threshold="0"), TypeError, "`threshold`", _model),
    Bad(
        _CR, lambda m: compression_report(m, weights_only=None), TypeError, "`weights_only`", _model
    ),
    Bad(_CR, lambda m: compression_report(m), ValueError, "`0.weight`", _nan_model, id="cr-nan"),
    Bad(
        _CR,
        lambda m: compression_report(nn.BatchNorm1d(3)),
        ValueError,
        "`model`",
        _model,
        id="cr-no-weights",
    ),
]


# ----------------------------------------------------------------- functional
def _tensors() -> list[torch.Tensor]:
    return [torch.tensor([[-2.0, 3.0]]), torch.tensor([[1, -2]])]


_CS, _ST = "functional.coherence_statistics", "functional.soft_threshold_"
CASES += [
    Bad(_CS, lambda t: coherence_statistics([t[0]], [t[0]], "l3"), ValueError, "`kind`", _tensors),
    Bad(
        _CS,
        lambda t: coherence_statistics(t[0], [t[0]]),
        TypeError,
        "`grads`",
        _tensors,
        id="cs-tensor",
    ),
    Bad(
        _CS,
        lambda t: coherence_statistics([t[1]], [t[1]]),
        TypeError,
        "`grads[0]`",
        _tensors,
        id="cs-int",
    ),
    Bad(
        _CS,
        lambda t: coherence_statistics([t[0]], [t[0].t()]),
        ValueError,
        "`weights`",
        _tensors,
        id="cs-shape",
    ),
    Bad(
        _CS, lambda t: coherence_statistics([], []), ValueError, "`grads`", _tensors, id="cs-empty"
    ),
    Bad(
        _ST,
        lambda t: soft_threshold_(t, 1.0),
        TypeError,
        "`tensors[1]`",
        _tensors,
        id="st-int-after-float",
    ),
    Bad(
        _ST,
        lambda t: soft_threshold_(t[:1], -1.0),
        ValueError,
        "`threshold`",
        _tensors,
        id="st-negative",
    ),
    Bad(
        _ST, lambda t: soft_threshold_(t[0], 1.0), TypeError, "`tensors`", _tensors, id="st-tensor"
    ),
    Bad(
        "functional.group_soft_threshold_",
        lambda t: group_soft_threshold_(t, 1.0),
        TypeError,
        "`tensors[1]`",
        _tensors,
        id="gst-int-after-float",
    ),
    Bad(
        "functional.group_soft_threshold_",
        lambda t: group_soft_threshold_(t[:1], -1.0),
        ValueError,
        "`threshold`",
        _tensors,
        id="gst-negative",
    ),
    Bad(
        "functional.group_soft_threshold_",
        lambda t: group_soft_threshold_(t[0], 1.0),
        TypeError,
        "`tensors`",
        _tensors,
        id="gst-tensor",
    ),
]
