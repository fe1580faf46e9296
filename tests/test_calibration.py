"""ResponseCalibration and its functional forms against a scipy reference of the formula."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from tests.reference import calibrated_response, linear_params, predicted_stats
from torch_recal import ResponseCalibration
from torch_recal.functional import response_calibration, response_calibration_residual

SHAPES = [(3, 5, 7), (2, 6, 5, 4), (2, 4, 3, 4, 5)]  # 3D, 4D, 5D responses


def _randomise(layer: ResponseCalibration, scale: float = 0.5) -> None:
    """Give the MLP non-trivial weights so mu/sigma differ clearly from 0/1."""
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, scale)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("confidence", ["cdf", "pdf"])
@pytest.mark.parametrize("per_sample", [True, False])
def test_functional_matches_scipy_formula(shape, confidence, per_sample):
    u = torch.randn(shape, dtype=torch.float64) * 2
    stat_shape = (shape[0], shape[1]) if per_sample else (shape[1],)
    mu = torch.randn(stat_shape, dtype=torch.float64)
    sigma = torch.rand(stat_shape, dtype=torch.float64) + 0.1
    out = response_calibration(u, mu, sigma, eps=1e-5, confidence=confidence)
    ref = calibrated_response(u.numpy(), mu.numpy(), sigma.numpy(), 1e-5, confidence)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_functional_tail_is_exact_far_from_the_mean():
    # |z| up to 40: w underflows gracefully, out -> u (no nan, no 1 - 1 cancellation blow-up)
    u = torch.linspace(-40, 40, 161, dtype=torch.float64).reshape(1, 1, -1)
    out = response_calibration(u, torch.zeros(1, 1), torch.ones(1, 1), eps=1e-5)
    ref = calibrated_response(u.numpy(), np.zeros((1, 1)), np.ones((1, 1)), 1e-5)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-14, atol=0)


@pytest.mark.parametrize("relu", [True, False])
def test_residual_form_fuses_shortcut_and_relu(relu):
    u, x = (
        torch.randn(2, 6, 5, 4, dtype=torch.float64),
        torch.randn(2, 6, 5, 4, dtype=torch.float64),
    )
    mu, sigma = torch.randn(2, 6, dtype=torch.float64), torch.rand(2, 6, dtype=torch.float64) + 0.2
    out = response_calibration_residual(u, x, mu, sigma, relu=relu)
    ref = calibrated_response(u.numpy(), mu.numpy(), sigma.numpy()) + x.numpy()
    if relu:
        ref = np.maximum(ref, 0)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_tokens_channel_last():
    u = torch.randn(2, 9, 6, dtype=torch.float64)  # (N, L, C)
    mu, sigma = torch.randn(2, 6, dtype=torch.float64), torch.rand(2, 6, dtype=torch.float64) + 0.2
    out = response_calibration(u, mu, sigma, channel_dim=-1)
    ref = calibrated_response(u.numpy(), mu.numpy(), sigma.numpy(), channel_dim=-1)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("confidence", ["cdf", "pdf"])
def test_module_predicted_stats_match_reference(shape, confidence):
    layer = ResponseCalibration(shape[1], reduction=2, confidence=confidence, dtype=torch.float64)
    _randomise(layer)
    u = torch.randn(shape, dtype=torch.float64)
    mu, sigma = predicted_stats(
        u.numpy(), linear_params(layer.fc1), linear_params(layer.fc_mu),
        linear_params(layer.fc_logvar),
    )  # fmt: skip
    ref = calibrated_response(u.numpy(), mu, sigma, 1e-5, confidence)
    np.testing.assert_allclose(layer(u).detach().numpy(), ref, rtol=1e-11, atol=1e-12)


def test_module_tokens_channel_last_matches_reference():
    layer = ResponseCalibration(8, reduction=4, channel_dim=-1, dtype=torch.float64)
    _randomise(layer)
    u = torch.randn(3, 11, 8, dtype=torch.float64)
    mu, sigma = predicted_stats(
        u.numpy(), linear_params(layer.fc1), linear_params(layer.fc_mu),
        linear_params(layer.fc_logvar), channel_dim=-1,
    )  # fmt: skip
    ref = calibrated_response(u.numpy(), mu, sigma, channel_dim=-1)
    np.testing.assert_allclose(layer(u).detach().numpy(), ref, rtol=1e-11, atol=1e-12)


def test_static_and_fixed_stats():
    u = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    static = ResponseCalibration(4, stats="static", dtype=torch.float64)
    with torch.no_grad():
        static.mu.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        static.logvar.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    sigma = np.exp(static.logvar.detach().numpy() / 2)
    ref = calibrated_response(u.numpy(), static.mu.detach().numpy(), sigma)
    np.testing.assert_allclose(static(u).detach().numpy(), ref, rtol=1e-12)
    fixed = ResponseCalibration(4, stats="fixed", dtype=torch.float64)
    assert list(fixed.parameters()) == []
    ref = calibrated_response(u.numpy(), np.zeros(4), np.ones(4))
    np.testing.assert_allclose(fixed(u).numpy(), ref, rtol=1e-12)


def test_init_is_the_official_one():
    torch.manual_seed(0)
    layer = ResponseCalibration(256, reduction=4)
    assert layer.fc1.out_features == 64
    for fc in (layer.fc1, layer.fc_mu, layer.fc_logvar):
        assert torch.all(fc.bias == 0)
        assert abs(fc.weight.std().item() - 0.01) < 0.001
        assert abs(fc.weight.mean().item()) < 0.001
    assert ResponseCalibration(3, reduction=16).fc1.out_features == 1  # max(1, C // r)


def _float64_leaves() -> tuple[torch.Tensor, ...]:
    """Response, shortcut, per-sample mean and (positive) scale for the gradient checks."""
    u = torch.randn(2, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    mu = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    sigma = (torch.rand(2, 3, dtype=torch.float64) + 0.3).requires_grad_()
    return u, x, mu, sigma


def test_gradcheck_functional_float64():
    u, x, mu, sigma = _float64_leaves()
    for conf in ("cdf", "pdf"):
        assert torch.autograd.gradcheck(
            lambda *a, c=conf: response_calibration(*a, confidence=c), (u, mu, sigma)
        )
    # relu kink: keep the shortcut away from -u so the finite differences stay on one side
    assert torch.autograd.gradcheck(
        lambda u, s, m, sg: response_calibration_residual(u, s, m, sg), (u, x, mu, sigma)
    )


def test_double_backward_gradgradcheck_float64():
    # GenerativeGradientLoss differentiates through gradients (create_graph=True)
    u, x, mu, sigma = _float64_leaves()
    for conf in ("cdf", "pdf"):
        assert torch.autograd.gradgradcheck(
            lambda *a, c=conf: response_calibration_residual(*a, confidence=c, relu=False),
            (u, x, mu, sigma),
        )
    assert torch.autograd.gradgradcheck(
        lambda *a: response_calibration(*a, confidence="cdf"), (u, mu, (sigma * 1).detach())
    )


def test_gradcheck_module_parameters_float64():
    layer = ResponseCalibration(4, reduction=2, dtype=torch.float64)
    _randomise(layer, 0.3)
    u = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    params = tuple(layer.parameters())

    def f(u, *ps):
        saved = [p.data for p in params]
        for p, new in zip(params, ps, strict=True):
            p.data = new
        try:
            return torch.func.functional_call(
                layer, dict(zip([n for n, _ in layer.named_parameters()], ps, strict=True)), (u,)
            )
        finally:
            for p, old in zip(params, saved, strict=True):
                p.data = old

    inputs = (u, *(p.detach().clone().requires_grad_() for p in params))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("logvar_bias", [-1e4, -200.0, 60.0, 200.0, 1e4])
def test_autocast_extreme_logvar_is_finite(dtype, logvar_bias):
    layer = ResponseCalibration(8)
    with torch.no_grad():
        layer.fc_logvar.bias.fill_(logvar_bias)
    u = (torch.randn(4, 8, 6, 6) * 50).requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        out = layer(u.to(dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    out.float().sum().backward()
    assert torch.isfinite(u.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_half_precision_input_computes_in_float32():
    u = torch.randn(2, 4, 8, 8)
    mu, sigma = torch.randn(2, 4), torch.rand(2, 4) + 0.5
    ref = calibrated_response(u.numpy(), mu.numpy(), sigma.numpy())
    out = response_calibration(u.to(torch.bfloat16), mu, sigma)
    assert out.dtype == torch.bfloat16
    # only the input/output roundings of bf16 (8 bits of mantissa) remain
    np.testing.assert_allclose(out.float().numpy(), ref, rtol=2e-2, atol=2e-2)


def test_train_and_eval_outputs_identical():
    layer = ResponseCalibration(6)
    _randomise(layer)
    u = torch.randn(3, 6, 5, 5)
    train_out = layer.train()(u)
    eval_out = layer.eval()(u)
    assert torch.equal(train_out, eval_out)
    assert list(layer.buffers()) == []  # no running statistics


def test_no_cross_sample_leakage():
    layer = ResponseCalibration(6)
    _randomise(layer)
    u = torch.randn(4, 6, 5, 5)
    single = torch.cat([layer(u[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(layer(u), single)


def test_device_and_dtype_kwargs():
    layer = ResponseCalibration(4, device="cpu", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())


def _reference_with_clamp(layer: ResponseCalibration, u: np.ndarray) -> np.ndarray:
    """The documented function in float64: predicted stats with logvar clamped to +-30."""
    u = np.asarray(u, dtype=np.float64)
    s = u.mean(axis=tuple(range(2, u.ndim)))
    (w1, b1), (wm, bm), (wl, bl) = (
        linear_params(fc) for fc in (layer.fc1, layer.fc_mu, layer.fc_logvar)
    )
    h = s @ w1.T + b1
    mu, logvar = h @ wm.T + bm, np.clip(h @ wl.T + bl, -30.0, 30.0)
    return calibrated_response(u, mu, np.exp(logvar / 2), layer.eps, layer.confidence)


@pytest.mark.parametrize("magnitude", [1e30, 1e38, 3e38])
def test_huge_finite_input_matches_a_float64_reference(magnitude):
    # a float32 sum of 64 values near 1e38 overflows: the spatial mean must not
    layer = ResponseCalibration(8)
    u = torch.randn(2, 8, 8, 8).sign() * magnitude
    u[:, :, 0, 0] = torch.randn(2, 8)  # ordinary values beside the huge ones
    u.requires_grad_()
    out = layer(u)
    assert torch.isfinite(out).all()
    ref = _reference_with_clamp(layer, u.detach().numpy())
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-6, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(u.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("channel_dim", [1, -1])
@pytest.mark.parametrize("relu", [True, False])
def test_module_with_shortcut_is_the_fused_block_tail(channel_dim, relu):
    layer = ResponseCalibration(6, reduction=2, channel_dim=channel_dim, dtype=torch.float64)
    _randomise(layer)
    u = torch.randn(3, 6, 5, 4, dtype=torch.float64)
    if channel_dim == -1:
        u = u.movedim(1, -1).contiguous()
    x = torch.randn_like(u)
    mu, sigma = predicted_stats(
        u.numpy(), linear_params(layer.fc1), linear_params(layer.fc_mu),
        linear_params(layer.fc_logvar), channel_dim=channel_dim,
    )  # fmt: skip
    ref = calibrated_response(u.numpy(), mu, sigma, channel_dim=channel_dim) + x.numpy()
    if relu:
        ref = np.maximum(ref, 0)
    out = layer(u, x, relu=relu)
    np.testing.assert_allclose(out.detach().numpy(), ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(layer.forward_residual(u, x, relu), out, rtol=0, atol=0)
    # without a shortcut `relu` changes nothing: the calibrated response alone
    torch.testing.assert_close(layer(u, relu=True), layer(u), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_input_dtype_other_than_the_module_computes_and_returns_the_input_dtype(dtype):
    # no autocast: the MLP runs in the module's float32, the chain in >= float32, output dtype
    # is the input's (bf16/fp16 responses in a float32 model, as mixed-precision users pass)
    layer = ResponseCalibration(8, reduction=2)
    _randomise(layer, 0.2)
    u = torch.randn(2, 8, 6, 6).to(dtype)
    out = layer(u)
    assert out.dtype == dtype
    u64 = u.double().numpy()
    mu, sigma = predicted_stats(
        u64, linear_params(layer.fc1), linear_params(layer.fc_mu), linear_params(layer.fc_logvar)
    )
    ref = calibrated_response(u64, mu, sigma)
    tol = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float64: 1e-6}[dtype]
    np.testing.assert_allclose(out.double().detach().numpy(), ref, rtol=tol, atol=tol)


def test_float32_input_to_a_float64_module():
    layer = ResponseCalibration(4, reduction=2, dtype=torch.float64)
    _randomise(layer, 0.3)
    u = torch.randn(2, 4, 5, 5)
    out = layer(u)
    assert out.dtype == torch.float32
    ref = layer(u.double()).float()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


BAD_INPUTS = [
    pytest.param([[[1.0]]], TypeError, id="list"),
    pytest.param(torch.ones(2, 4, 3, 3, dtype=torch.int64), TypeError, id="int"),
    pytest.param(torch.ones(2, 4, 3, 3, dtype=torch.bool), TypeError, id="bool"),
    pytest.param(torch.ones(2, 4, 3, 3, dtype=torch.complex64), TypeError, id="complex"),
    pytest.param(torch.ones(2, 4), ValueError, id="2d"),
    pytest.param(torch.ones(2, 5, 3, 3), ValueError, id="channels"),
]


@pytest.mark.parametrize(("u", "error"), BAD_INPUTS)
def test_module_and_functional_forms_reject_the_same_inputs_alike(u, error):
    layer = ResponseCalibration(4)
    mu, sigma = torch.zeros(2, 4), torch.ones(2, 4)
    messages = []
    for call in (
        lambda: layer(u),
        lambda: layer(torch.randn(2, 4, 3, 3), u),  # the same mistakes as a shortcut
        lambda: response_calibration(u, mu, sigma),
        lambda: response_calibration_residual(u, torch.randn(2, 4, 3, 3), mu, sigma),
    ):
        with pytest.raises(error) as info:
            call()
        messages.append(str(info.value))
    assert all("`u`" in m for m in messages[::2]), messages
    assert "`shortcut`" in messages[1] and "`u`" in messages[3], messages


def test_repr_and_state_dict_keys():
    layer = ResponseCalibration(8, 4)
    assert "reduction=4" in repr(layer)
    assert set(layer.state_dict()) == {
        f"{n}.{p}" for n in ("fc1", "fc_mu", "fc_logvar") for p in ("weight", "bias")
    }
    assert isinstance(layer.fc1, nn.Linear)
