"""shrink() and save_sparse()/load_sparse().

shrink: the references are the original model's outputs (eval mode, to 1e-6), numpy for the
folded biases, and parameter counts worked out by hand in the comments. The sparse format:
bit-exact round trips compared on the integer view, and file sizes against the bytes the
encoding predicts (1/8 byte per entry for the mask + 4 bytes per non-zero float32).
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from torch_recal import ShrinkReport, load_sparse, save_sparse, shrink
from torch_recal.shrink import KeptUnits
from torch_recal.sparse_io import pack_sparse, unpack_sparse


def _same_outputs(small: nn.Module, model: nn.Module, x: torch.Tensor) -> None:
    small.eval()
    model.eval()
    with torch.no_grad():
        expected, got = model(x), small(x)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=0, atol=1e-6), (got - expected).abs().max()


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _random_bn(bn: nn.modules.batchnorm._BatchNorm) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


# --------------------------------------------------------------------------- (a) MLP
def _mlp() -> nn.Sequential:
    """Linear(6, 10) -> ReLU -> Linear(10, 8) -> ReLU -> Linear(8, 3), with
    layer 0: unit 0 dead (zero weights and bias), unit 1 zero weights + bias 0.7 (ReLU keeps
      0.7: folded into layer 2's bias), unit 2 zero weights + bias -0.3 (ReLU gives 0),
      unit 3 unused (column 3 of layer 2 is zero), unit 9 used only by layer 2's unit 7;
    layer 2: unit 5 zero weights + bias 0.4 (folded into layer 4), unit 7 unused (column 7 of
      layer 4 is zero): removing it leaves layer 0's unit 9 unused (a second round).
    """
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].weight[:3] = 0.0
        model[0].bias[:3] = torch.tensor([0.0, 0.7, -0.3])
        model[2].weight[:, 3] = 0.0
        model[2].weight[:, 9] = 0.0
        model[2].weight[7, 9] = 1.3
        model[2].weight[5] = 0.0
        model[2].bias[5] = 0.4
        model[4].weight[:, 7] = 0.0
    return model.eval()


def test_mlp_dead_folded_and_unused_units_go_and_outputs_match():
    model = _mlp()
    small, report = shrink(model)
    _same_outputs(small, model, torch.randn(64, 6))
    # layer 0: 10 -> 5 units (0, 1, 2 dead; 3 unused; 9 unused after layer 2 lost unit 7)
    # layer 2: 8 -> 6 units (5 dead, folded; 7 unused), 10 -> 5 inputs
    # layer 4: 8 -> 6 inputs
    assert (small[0].in_features, small[0].out_features) == (6, 5)
    assert (small[2].in_features, small[2].out_features) == (5, 6)
    assert (small[4].in_features, small[4].out_features) == (6, 3)
    before = (6 * 10 + 10) + (10 * 8 + 8) + (8 * 3 + 3)  # 185
    after = (6 * 5 + 5) + (5 * 6 + 6) + (6 * 3 + 3)  # 35 + 36 + 21 = 92
    assert (_params(small), report.params_before, report.params_after) == (after, before, after)
    assert report.compression_ratio == pytest.approx(before / after)
    first, second, last = report.layers
    assert (first.removed_dead, first.removed_unused, first.folded) == (3, 2, 1)
    assert (second.removed_dead, second.removed_unused, second.folded) == (1, 1, 1)
    assert (last.units_before, last.units_after, last.inputs_after) == (3, 3, 6)
    assert report.kept == () and report.tracer == "fx" and report.rounds >= 2


def test_mlp_folded_bias_matches_numpy():
    model = _mlp()
    w2, b2 = model[2].weight.detach().numpy(), model[2].bias.detach().numpy()
    w4, b4 = model[4].weight.detach().numpy(), model[4].bias.detach().numpy()
    small, _ = shrink(model)
    rows2 = [0, 1, 2, 3, 4, 6]  # layer 2 keeps all rows but 5 (dead) and 7 (unused)
    expected2 = (b2 + w2[:, 1] * 0.7)[rows2]  # layer 0's unit 1 outputs relu(0.7) = 0.7
    relu_b = max(0.4, 0.0)  # layer 2's unit 5 outputs relu(0.4)
    expected4 = b4 + w4[:, 5] * relu_b
    np.testing.assert_allclose(small[2].bias.detach().numpy(), expected2, rtol=0, atol=1e-6)
    np.testing.assert_allclose(small[4].bias.detach().numpy(), expected4, rtol=0, atol=1e-6)


def test_final_output_units_are_never_removed_and_are_reported():
    model = _mlp()
    with torch.no_grad():
        model[4].weight[1] = 0.0
        model[4].bias[1] = 0.0
    small, report = shrink(model)
    assert small[4].out_features == 3
    assert KeptUnits("4", 1, "output is the model output") in report.kept
    assert "4: 1 dead unit kept: output is the model output" in str(report)


def test_a_layer_keeps_one_unit_when_all_would_go():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([-1.0, 0.5, 0.0, 2.0]))
    small, report = shrink(model)
    _same_outputs(small, model, torch.randn(8, 3))
    assert small[0].out_features == 1 and small[2].in_features == 1
    assert any("last unit" in k.reason for k in report.kept)


# --------------------------------------------------------------------------- (b) CNN
def _cnn() -> nn.Sequential:
    """Conv(3->8, pad 1)-BN-ReLU-MaxPool(2)-Conv(8->6, pad 1, no bias)-BN-ReLU-Flatten-
    Linear(6*4*4 -> 10)-ReLU-Linear(10 -> 4) on 8x8 inputs, with
    conv 0: unit 0 dead, BN constant +1.0 -> ReLU 1.0 -> padded conv 4: kept and reported;
      unit 1 dead, BN constant (0.3 - 0.1) / sqrt(1 + eps) - 2 < 0 -> ReLU 0: removed;
      unit 2 unused (conv 4's input channel 2 is zero);
    conv 4: unit 0 dead (no bias), BN constant 0.5 -> ReLU 0.5 -> Flatten -> Linear 8:
      folded into its bias (16 columns); unit 3 unused (Linear 8's columns 48..63 are zero);
    linear 8: unit 4 zero weights + bias -1 (ReLU 0): removed; unit 6 unused.
    """
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 10),
        nn.ReLU(),
        nn.Linear(10, 4),
    )
    _random_bn(model[1])
    _random_bn(model[5])
    with torch.no_grad():
        model[0].weight[0] = 0.0
        model[0].bias[0] = 0.0
        model[1].running_mean[0], model[1].bias[0] = 0.0, 1.0
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.3
        model[1].running_mean[1], model[1].running_var[1] = 0.1, 1.0
        model[1].weight[1], model[1].bias[1] = 1.0, -2.0
        model[4].weight[:, 2] = 0.0
        model[4].weight[0] = 0.0
        model[5].running_mean[0], model[5].bias[0] = 0.0, 0.5
        model[8].weight[:, 48:64] = 0.0
        model[8].weight[4] = 0.0
        model[8].bias[4] = -1.0
        model[10].weight[:, 6] = 0.0
    return model.eval()


@pytest.mark.parametrize("how", ["fx", "fx+shapes", "sequential"])
def test_cnn_with_batchnorm_shrinks_exactly(how: str):
    model = _cnn()
    x = torch.randn(5, 3, 8, 8)
    kw = {"sequential": {"trace": "sequential"}, "fx+shapes": {"example_inputs": x}}.get(how, {})
    small, report = shrink(model, **kw)
    _same_outputs(small, model, x)
    assert [small[i].out_channels for i in (0, 4)] == [6, 4]  # conv 0: -1 dead, -1 unused
    assert [small[i].num_features for i in (1, 5)] == [6, 4]
    assert small[4].in_channels == 6 and small[4].bias is None
    assert (small[8].in_features, small[8].out_features, small[10].in_features) == (64, 8, 8)
    before = (8 * 3 * 9 + 8) + 16 + 6 * 8 * 9 + 12 + (96 * 10 + 10) + (10 * 4 + 4)  # 1698
    after = (6 * 3 * 9 + 6) + 12 + 4 * 6 * 9 + 8 + (64 * 8 + 8) + (8 * 4 + 4)  # 960
    assert (report.params_before, report.params_after, _params(small)) == (before, after, after)
    assert report.tracer == ("sequential" if how == "sequential" else "fx")
    (kept,) = report.kept
    assert (kept.layer, kept.count) == ("0", 1)
    assert "zero-padded conv `4`" in kept.reason
    by_name = {x.name: x for x in report.layers}
    assert (by_name["4"].removed_dead, by_name["4"].folded, by_name["4"].removed_unused) == (
        1,
        1,
        1,
    )


@pytest.mark.parametrize(
    ("conv_kwargs", "folded"),
    [({"padding": 0}, True), ({"padding": 1, "padding_mode": "replicate"}, True),
     ({"padding": 1}, False)],
    ids=["no-padding", "replicate-padding", "zero-padding"],
)  # fmt: skip
def test_constant_is_folded_into_a_conv_only_without_zero_padding(conv_kwargs, folded):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.SiLU(), nn.Conv2d(4, 3, 3, **conv_kwargs)
    ).eval()
    _random_bn(model[1])
    with torch.no_grad():
        model[0].weight[2] = 0.0  # constant silu(bn(bias_2)), not zero
    small, report = shrink(model)
    _same_outputs(small, model, torch.randn(3, 2, 9, 9))
    assert small[0].out_channels == (3 if folded else 4)
    assert bool(report.kept) is not folded


def test_average_pool_padding_keeps_a_non_zero_constant_channel():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.ReLU(), nn.AvgPool2d(3, stride=1, padding=1), nn.Conv2d(4, 3, 1)
    ).eval()
    with torch.no_grad():
        model[0].weight[1] = 0.0
        model[0].bias[1] = 0.5  # 0.5 everywhere, but less at the borders after the pool
    small, report = shrink(model)
    _same_outputs(small, model, torch.randn(2, 2, 7, 7))
    assert small[0].out_channels == 4
    assert "borders" in report.kept[0].reason


# --------------------------------------------------------------------------- (c) residual
class _Block(nn.Module):
    """conv1 -> bn1 -> relu -> conv2 -> bn2 -> (+ x) -> relu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + x)


def test_residual_dead_channels_are_kept_and_reported():
    torch.manual_seed(4)
    block = _Block()
    _random_bn(block.bn1)
    _random_bn(block.bn2)
    with torch.no_grad():
        block.conv2.weight[:2] = 0.0  # feeds the add: kept
        block.conv1.weight[3] = 0.0  # bn1 constant negative -> relu 0: removed
        block.bn1.running_mean[3], block.bn1.bias[3] = 0.0, -0.2
    block.eval()
    small, report = shrink(block)
    _same_outputs(small, block, torch.randn(2, 4, 6, 6))
    assert small.conv1.out_channels == 3 and small.conv2.in_channels == 3
    assert small.conv2.out_channels == 4 and small.bn2.num_features == 4
    assert report.params_after == 3 * 4 * 9 + 6 + 4 * 3 * 9 + 8  # 230 (was 304)
    assert report.params_before == 4 * 4 * 9 * 2 + 16
    assert [str(k) for k in report.kept] == [
        "conv2: 2 dead units kept: output feeds an add (residual stream)"
    ]


# --------------------------------------------------------------------------- contract
def test_input_model_is_unchanged_unless_inplace():
    model = _cnn()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    kinds = [type(m) for m in model.modules()]
    small, _ = shrink(model)
    assert small is not model
    assert [type(m) for m in model.modules()] == kinds
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model[0].out_channels == 8

    reference = copy.deepcopy(model)
    same, report = shrink(model, inplace=True)
    assert same is model and model[0].out_channels == 6 and report.params_after == 960
    _same_outputs(model, reference, torch.randn(2, 3, 8, 8))


def test_shrunk_model_trains_keeps_mode_dtype_and_requires_grad():
    model = _mlp().double().train()
    model[4].bias.requires_grad_(False)
    small, _ = shrink(model)
    assert small.training and all(m.training for m in small.modules())
    assert all(p.dtype == torch.float64 for p in small.parameters())
    assert not small[4].bias.requires_grad and small[0].weight.requires_grad
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    x, y = torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,))
    loss = nn.functional.cross_entropy(small(x), y)
    loss.backward()
    assert small[0].weight.grad is not None and small[0].weight.grad.shape == (5, 6)
    opt.step()
    assert nn.functional.cross_entropy(small(x), y) < loss


class _Flip(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


def test_untraceable_model_falls_back_to_traceable_submodules_and_sequentials():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = _mlp()  # traceable on its own
            self.head = nn.Sequential(  # not traceable (_Flip): its children are walked
                nn.Linear(3, 6), nn.ReLU(), nn.Linear(6, 4), _Flip(), nn.Linear(4, 2)
            )
            with torch.no_grad():
                self.head[0].weight[:2] = 0.0
                self.head[0].bias[:2] = -1.0  # ReLU gives 0: removed

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x) if x.sum() > 0 else -self.body(x))

    model = Branchy().eval()
    with pytest.warns(UserWarning, match="cannot trace"):
        small, report = shrink(model)
    assert report.tracer == "submodules" and "TraceError" in (report.trace_error or "")
    _same_outputs(small, model, torch.randn(8, 6).abs())
    # body: 185 -> 92 as in the MLP test; head: 24 + 28 + 10 = 62 -> (3*4+4) + (4*4+4) + 10 = 46
    assert (report.params_before, report.params_after) == (185 + 62, 92 + 46)
    assert small.body[0].out_features == 5 and small.head[0].out_features == 4
    with pytest.raises(ValueError, match="`model` cannot be traced"):
        shrink(model, trace="fx")


def test_example_inputs_check_catches_a_forward_that_reads_weights_directly():
    class ReadsWeights(nn.Module):  # untraceable; uses body[0].weight outside body's forward
        def __init__(self) -> None:
            super().__init__()
            self.body = _mlp()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            extra = (x @ self.body[0].weight.T).sum(dim=1, keepdim=True)  # every unit's row
            out = self.body(x) + extra
            return out if x.sum() > 0 else -out

    model = ReadsWeights().eval()
    x = torch.randn(8, 6).abs()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="cannot trace"):
        _, report = shrink(model)  # no inputs: nothing checks (documented)
    assert report.max_abs_error is None
    with (
        pytest.warns(UserWarning, match="cannot trace"),
        pytest.raises(ValueError, match="differ from the model's by up to"),
    ):
        shrink(model, example_inputs=x, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.body[0].out_features == 10  # unchanged after the error
    _, report = shrink(_mlp().eval(), example_inputs=x)  # a model it shrinks exactly
    assert report.max_abs_error is not None and report.max_abs_error < 1e-5
    assert report.to_dict()["max_abs_error"] == report.max_abs_error


def test_shared_or_twice_called_layers_are_kept():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(torch.relu(self.a(x)))))

    model = Twice().eval()
    with torch.no_grad():
        model.a.weight[0] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small, report = shrink(model)
    _same_outputs(small, model, torch.randn(3, 4))
    assert report.params_after == report.params_before
    assert "called 2 times" in report.kept[0].reason


def test_report_is_plain_data_and_a_table():
    _, report = shrink(_cnn())
    assert isinstance(report, ShrinkReport)
    data = report.to_dict()
    assert data["params_after"] == 960 and data["kept"][0]["layer"] == "0"
    assert data["layers"][0] == {
        "name": "0", "kind": "Conv2d", "units_before": 8, "units_after": 6, "inputs_before": 3,
        "inputs_after": 3, "params_before": 224, "params_after": 168, "removed_dead": 1,
        "removed_unused": 1, "folded": 0, "bias_added": False,
    }  # fmt: skip
    text = str(report)
    assert "8 -> 6" in text and "1698 -> 960" in text and "dead unit kept" in text


def test_bad_arguments():
    with pytest.raises(TypeError, match="`model`"):
        shrink(None)  # type: ignore[type-var]
    with pytest.raises(TypeError, match="`model`"):
        shrink(torch.zeros(3))  # type: ignore[type-var]
    with pytest.raises(ValueError, match="`trace`"):
        shrink(_mlp(), trace="jit")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`inplace`"):
        shrink(_mlp(), inplace="yes")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`example_inputs`"):
        shrink(_mlp(), example_inputs=3)  # type: ignore[arg-type]
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="`example_inputs`"):
        shrink(model, example_inputs=torch.randn(2, 5), inplace=True)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --------------------------------------------------------------------------- sparse save
def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def _sparse(shape: tuple[int, ...], sparsity: float, dtype=torch.float32) -> torch.Tensor:
    n = int(np.prod(shape))
    out = torch.zeros(n, dtype=dtype)
    keep = torch.randperm(n)[: round(n * (1 - sparsity))]
    out[keep] = torch.randn(len(keep)).to(dtype)
    return out.reshape(shape)


def test_sparse_round_trip_is_bit_exact():
    torch.manual_seed(5)
    special = _sparse((64,), 0.9)
    special[0] = -0.0
    special[1] = torch.tensor([0x7FC00123], dtype=torch.int32).view(torch.float32)  # NaN payload
    special[2] = float("-inf")
    state = {
        "special": special,
        "conv.weight": _sparse((8, 4, 3, 3), 0.9),
        "dense": torch.randn(10, 10),  # below min_sparsity
        "half": _sparse((33,), 0.8, torch.float16),
        "bf16": _sparse((5, 7), 0.8, torch.bfloat16),
        "double": _sparse((3, 3), 0.7, torch.float64),
        "int": torch.tensor([0, 0, 0, 5]),
        "empty": torch.zeros(0, 3),
        "count": torch.tensor(7),
    }
    packed = pack_sparse(state)
    assert set(packed["sparse"]) == {"special", "conv.weight", "half", "bf16", "double"}
    buffer = io.BytesIO()
    save_sparse(state, buffer)
    buffer.seek(0)
    loaded = load_sparse(buffer, map_location="cpu")
    assert list(loaded) == list(state)
    for key, value in state.items():
        assert loaded[key].dtype == value.dtype and loaded[key].shape == value.shape, key
        assert torch.equal(_bits(loaded[key]), _bits(value)), key
    assert torch.equal(_bits(unpack_sparse(packed)["special"]), _bits(special))


def test_negative_zeros_keep_their_sign_at_one_bit_per_zero():
    w = torch.tensor([0.0, -0.0, 1.0, -0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -2.0])
    entry = pack_sparse({"w": w})["sparse"]["w"]
    assert entry["values"].tolist() == [1.0, -2.0]  # -0.0 is a zero, not a value
    assert entry["mask"].tolist() == [0b00000100, 0b10]
    assert entry["negative_zeros"].tolist() == [0b00000110]  # zeros 1 and 2 of 8 are -0.0
    assert torch.equal(_bits(unpack_sparse(pack_sparse({"w": w}))["w"]), _bits(w))
    assert "negative_zeros" not in pack_sparse({"w": w.abs()})["sparse"]["w"]


def _size(obj, saver) -> int:
    buffer = io.BytesIO()
    saver(obj, buffer)
    return buffer.tell()


def test_file_is_smaller_by_the_predicted_factor_at_90_percent_sparsity():
    torch.manual_seed(6)
    n = 1000 * 1000
    w = _sparse((1000, 1000), 0.9)  # exactly 100000 non-zeros, all zeros +0.0
    sparse_bytes = n // 8 + 4 * 100_000  # 125000 (mask) + 400000 (values) = 525000
    dense_bytes = 4 * n
    got_sparse, got_dense = _size({"w": w}, save_sparse), _size({"w": w}, torch.save)
    assert abs(got_sparse - sparse_bytes) < 4096  # the zip container's overhead
    assert abs(got_dense - dense_bytes) < 4096
    assert got_dense / got_sparse == pytest.approx(dense_bytes / sparse_bytes, rel=0.02)  # 7.6x
    # a soft-thresholded tensor: half of its 900000 zeros are -0.0: + 1 bit per zero
    signed = torch.where(torch.rand(n) < 0.5, 1.0, -1.0).reshape(1000, 1000) * w
    assert abs(_size({"w": signed}, save_sparse) - (sparse_bytes + 900_000 // 8)) < 4096


def test_load_sparse_restores_a_model_state_dict():
    torch.manual_seed(7)
    model = _cnn()
    with torch.no_grad():
        model[8].weight[model[8].weight.abs() < 0.05] = 0.0
    buffer = io.BytesIO()
    save_sparse(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _cnn()
    fresh.load_state_dict(load_sparse(buffer))
    for (k, a), b in zip(model.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_sparse_bad_arguments():
    with pytest.raises(ValueError, match="`min_sparsity`"):
        save_sparse({"w": torch.zeros(3)}, io.BytesIO(), min_sparsity=1.5)
    with pytest.raises(TypeError, match="`state_dict`"):
        save_sparse(torch.zeros(3), io.BytesIO())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`state_dict`"):
        save_sparse({1: torch.zeros(3)}, io.BytesIO())  # type: ignore[dict-item]
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match="`f`"):
        load_sparse(buffer)
