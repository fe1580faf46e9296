"""compression_report: exact zero counts (numpy reference), the effective weights of pruned
and parametrized modules, plain-data export, and the non-finite and empty cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from torch_recal import CompressionReport, compression_report


def test_counts_match_numpy_and_threshold():
    model = nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    with torch.no_grad():
        model[0].weight[model[0].weight.abs() < 0.1] = 0.0
        model[2].weight[:, :7] = 0.0
    w0, w2 = model[0].weight.detach().numpy(), model[2].weight.detach().numpy()
    report = compression_report(model)
    assert [x.name for x in report.layers] == ["0.weight", "2.weight"]
    zeros = int((w0 == 0).sum() + (w2 == 0).sum())
    assert (report.zeros, report.total) == (zeros, 300)
    assert report.compression_ratio == pytest.approx(300 / (300 - zeros))
    thr = compression_report(model, threshold=0.2)
    assert thr.zeros == int((np.abs(w0) <= 0.2).sum() + (np.abs(w2) <= 0.2).sum())
    for needle in ("0.weight", "total", "compression ratio"):
        assert needle in str(report)


def test_pruned_module_counts_the_masked_weight_not_weight_orig():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    prune.l1_unstructured(model[0], "weight", amount=0.5)  # 24 of 48 masked
    mask = model[0].weight_mask.numpy()
    report = compression_report(model)
    names = [x.name for x in report.layers]
    assert names == ["0.weight", "2.weight"]  # not "0.weight_orig"
    assert report.layers[0].zeros == int((mask == 0).sum()) == 24
    assert report.total == 48 + 18


def test_parametrized_module_counts_the_parametrized_value():
    class KeepFirstColumns(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(w)
            out[:, :2] = w[:, :2]
            return out

    layer = nn.Linear(5, 4)
    parametrize.register_parametrization(layer, "weight", KeepFirstColumns())
    report = compression_report(layer)
    assert [(x.name, x.numel, x.zeros) for x in report.layers] == [("weight", 20, 12)]


def test_tied_weights_are_counted_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    assert compression_report(model).total == 40


def test_to_dict_is_plain_data():
    layer = nn.Linear(4, 2)
    with torch.no_grad():
        layer.weight[:, :2] = 0.0
    data = compression_report(layer).to_dict()
    assert data["compression_ratio"] == 2.0 and data["zeros"] == 4
    assert data["layers"] == [{"name": "weight", "numel": 8, "zeros": 4, "sparsity": 0.5}]
    assert isinstance(compression_report(layer), CompressionReport)


def test_all_zero_is_inf_nan_weights_and_no_weights_are_errors():
    layer = nn.Linear(3, 3)
    nn.init.zeros_(layer.weight)
    assert compression_report(layer).compression_ratio == math.inf
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compression_report(layer)
    with pytest.raises(ValueError, match="no tensor"):
        compression_report(nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="threshold"):
        compression_report(nn.Linear(2, 2), threshold=-1.0)
