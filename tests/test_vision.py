"""calibrate() on torchvision and timm ResNets (needs the [vision] extra; skipped without it)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tests.reference import forward_with_reference_calibration
from torch_recal import ResponseCalibration, calibrate, is_calibrated, uncalibrate

pytestmark = pytest.mark.vision


def _torchvision(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)(weights=None, num_classes=10)


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False, num_classes=10)


def _positions(model: nn.Module) -> dict[str, ResponseCalibration]:
    """Where each inserted calibration sits, as the name of the module it follows."""
    out = {}
    for name, m in model.named_modules():
        cal = getattr(m, "calibration", None)
        if isinstance(cal, ResponseCalibration):  # torchvision bn2/bn3, or a chained timm SE
            out[name] = cal
        elif isinstance(getattr(m, "se", None), ResponseCalibration):  # filled timm slot
            out[f"{name}.{'bn3' if hasattr(m, 'bn3') else 'bn2'}"] = m.se
    return out


MODELS = [
    pytest.param(lambda: _torchvision("resnet18"), 8, id="torchvision-resnet18"),
    pytest.param(lambda: _torchvision("resnet50"), 16, id="torchvision-resnet50"),
    pytest.param(lambda: _timm("resnet18"), 8, id="timm-resnet18"),
    pytest.param(lambda: _timm("seresnet18"), 8, id="timm-seresnet18-chained"),
]


@pytest.mark.parametrize(("make", "n_blocks"), MODELS)
def test_pretrained_checkpoint_loads_and_only_new_keys_are_missing(make, n_blocks):
    torch.manual_seed(0)
    plain = make()
    checkpoint = plain.state_dict()  # what a pretrained download would hold
    model = calibrate(make(), reduction=16)
    new_keys = set(model.state_dict()) - set(checkpoint)
    assert len(new_keys) == 6 * n_blocks
    assert sum(isinstance(m, ResponseCalibration) for m in model.modules()) == n_blocks
    result = model.load_state_dict(checkpoint, strict=False)
    assert set(result.missing_keys) == new_keys
    assert result.unexpected_keys == []


@pytest.mark.parametrize(("make", "n_blocks"), MODELS)
def test_output_matches_the_formula(make, n_blocks):
    torch.manual_seed(0)
    plain = make().double().eval()
    with torch.no_grad():  # timm zero-inits the last norm of each branch: undo it
        for m in plain.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    model = calibrate(copy.deepcopy(plain), reduction=16)
    positions = _positions(model)
    assert len(positions) == n_blocks
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out = model(x)
        assert not torch.allclose(out, plain(x))
    expected = forward_with_reference_calibration(plain, x, positions)
    torch.testing.assert_close(out, expected, rtol=1e-8, atol=1e-9)


@pytest.mark.parametrize(("make", "n_blocks"), MODELS)
def test_idempotent_uncalibrate_and_copy(make, n_blocks):
    plain = make().eval()
    keys = list(plain.state_dict())
    classes = [type(m) for m in plain.modules()]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = plain(x)
    copy_ = calibrate(plain, inplace=False)
    assert not is_calibrated(plain) and list(plain.state_dict()) == keys
    model = calibrate(plain)
    once = list(model.state_dict())
    calibrate(model)
    assert list(model.state_dict()) == once
    uncalibrate(model)
    assert list(model.state_dict()) == keys
    assert [type(m) for m in model.modules()] == classes
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert is_calibrated(copy_)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: _torchvision("resnet18"), id="tv"),
        pytest.param(lambda: _timm("resnet18"), id="timm"),
    ],
)
def test_compile_fullgraph_and_export(make):
    model = calibrate(make()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(torch.compile(model, backend="eager", fullgraph=True)(x), ref)
    torch._dynamo.reset()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(x), ref)


@pytest.mark.parametrize(("make", "n_blocks"), MODELS)
def test_sync_batchnorm_conversion_keeps_the_calibration(make, n_blocks):
    torch.manual_seed(0)
    model = calibrate(make()).eval()
    keys = list(model.state_dict())
    layers = [m for m in model.modules() if isinstance(m, ResponseCalibration)]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert is_calibrated(model) and list(model.state_dict()) == keys
    assert [m for m in model.modules() if isinstance(m, ResponseCalibration)] == layers
    assert len(layers) == n_blocks
    with torch.no_grad():  # eval, one process: SyncBatchNorm computes what BatchNorm did
        torch.testing.assert_close(model(x), before, rtol=0, atol=0)
