"""Bad-call rows (tests/test_bad_calls.py): shrink, save_sparse, load_sparse."""

from __future__ import annotations

import io

import torch
from torch import nn

from tests.badcalls import Bad
from torch_recal import load_sparse, save_sparse, shrink

CASES: list[Bad] = []


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with torch.no_grad():
        model[0].weight[:2] = 0.0
    return model


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.tensor([0.0, 0.0, 0.0, 1.0])}


def _plain_file() -> io.BytesIO:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    buffer.seek(0)
    return buffer


_S = "shrink"
CASES += [
    Bad(_S, lambda m: shrink(None), TypeError, "`model`", _model),  # type: ignore[type-var]
    Bad(_S, lambda m: shrink(m[0].weight), TypeError, "`model`", _model, id="shrink-tensor"),
    Bad(_S, lambda m: shrink(m, trace="jit"), ValueError, "`trace`", _model),  # type: ignore[arg-type]
    Bad(_S, lambda m: shrink(m, trace=None), TypeError, "`trace`", _model, id="shrink-trace-none"),  # type: ignore[arg-type]
    Bad(_S, lambda m: shrink(m, inplace=1), TypeError, "`inplace`", _model),  # type: ignore[arg-type]
    Bad(_S, lambda m: shrink(m, example_inputs=3), TypeError, "`example_inputs`", _model),  # type: ignore[arg-type]
    Bad(
        _S,
        lambda m: shrink(m, example_inputs=torch.zeros(2, 5), inplace=True),
        ValueError,
        "`example_inputs`",
        _model,
        id="shrink-inputs-wrong-shape",
    ),
]

_SS = "save_sparse"
CASES += [
    Bad(_SS, lambda s: save_sparse(s["w"], io.BytesIO()), TypeError, "`state_dict`", _state),  # type: ignore[arg-type]
    Bad(
        _SS,
        lambda s: save_sparse({1: s["w"]}, io.BytesIO()),  # type: ignore[dict-item]
        TypeError,
        "`state_dict`",
        _state,
        id="save-int-key",
    ),
    Bad(
        _SS,
        lambda s: save_sparse(s, io.BytesIO(), min_sparsity=1.5),
        ValueError,
        "`min_sparsity`",
        _state,
    ),
    Bad(
        _SS,
        lambda s: save_sparse(s, io.BytesIO(), min_sparsity="0.5"),  # type: ignore[arg-type]
        TypeError,
        "`min_sparsity`",
        _state,
        id="save-min-sparsity-str",
    ),
]

CASES += [
    Bad("load_sparse", lambda s: load_sparse(_plain_file()), ValueError, "`f`", _state),
]
