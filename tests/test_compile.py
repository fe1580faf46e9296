"""The one compile policy: lazy, switchable, no inner compile under an outer one, safe fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import torch_recal
from torch_recal import _compile
from torch_recal.functional import response_calibration, response_calibration_residual
from torch_recal.models import resnet20


@pytest.fixture
def compile_on():
    torch_recal.set_compile(True)
    yield
    torch_recal.set_compile(False)
    torch._dynamo.reset()


@pytest.fixture
def fake_compile(monkeypatch, compile_on):
    """Replace the policy's torch.compile call by a recorder that returns the eager fn."""
    calls = []

    def recorder(fn, options):
        calls.append((fn.__qualname__, options))
        return fn

    monkeypatch.setattr(_compile, "_build", recorder)
    for lazy in _compile._registry:
        lazy.reset()
    return calls


def _args():
    return torch.randn(2, 4, 3, 3), torch.randn(2, 4), torch.rand(2, 4) + 0.5


def test_env_var_switches_compile_off():
    code = "import torch_recal; print(torch_recal.compile_enabled())"
    env = {**os.environ, "TORCH_RECAL_COMPILE": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr
    env["TORCH_RECAL_COMPILE"] = "1"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "True", out.stderr


def test_set_compile_validates():
    with pytest.raises(TypeError, match="enabled"):
        torch_recal.set_compile("yes")  # type: ignore[arg-type]


def test_compiles_lazily_once(fake_compile):
    response_calibration(*_args())
    response_calibration(*_args())
    assert [name for name, _ in fake_compile] == ["_forward"]
    u, mu, sigma = (t.requires_grad_() for t in _args())
    for _ in range(2):
        response_calibration(u, mu, sigma).sum().backward()
    assert [name for name, _ in fake_compile] == ["_forward", "_backward"]
    assert all(options["fullgraph"] is True for _, options in fake_compile)


def test_disabled_policy_never_compiles(fake_compile):
    torch_recal.set_compile(False)
    response_calibration(*_args())
    assert fake_compile == []


def test_no_inner_compile_when_the_user_compiles_or_exports(fake_compile):
    model = torch_recal.calibrate(resnet20()).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.compile(model, backend="eager", fullgraph=True)(x)
        torch.export.export(model, (x,))
    assert fake_compile == []


def test_failed_compile_falls_back_to_eager_with_one_warning(monkeypatch, compile_on):
    def broken(fn, options):
        def run(*args, **kwargs):
            raise RuntimeError("no C++ compiler found")

        return run

    monkeypatch.setattr(_compile, "_build", broken)
    for lazy in _compile._registry:
        lazy.reset()
    args = _args()
    torch_recal.set_compile(False)
    expected = response_calibration(*args)
    torch_recal.set_compile(True)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found") as record:
        out1 = response_calibration(*args)
        out2 = response_calibration(*args)
    assert len(record) == 1
    torch.testing.assert_close(out1, expected)
    torch.testing.assert_close(out2, expected)


def test_an_error_the_eager_function_raises_too_propagates_and_keeps_compiling_on(
    monkeypatch, compile_on
):
    def oom(fn, options):
        def run(*args, **kwargs):
            raise RuntimeError("compiled: out of memory")

        return run

    def eager(x: torch.Tensor) -> torch.Tensor:
        if x.numel() > 4:
            raise RuntimeError("eager: out of memory")
        return x + 1

    monkeypatch.setattr(_compile, "_build", oom)
    lazy = _compile.lazy_compile(eager)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            with pytest.raises(RuntimeError, match="eager: out of memory"):
                lazy(torch.zeros(8))
        assert not lazy.failed  # compiling stays on
        with pytest.warns(RuntimeWarning, match="compiled: out of memory"):
            torch.testing.assert_close(lazy(torch.zeros(2)), torch.ones(2))
        assert lazy.failed
    finally:
        _compile._registry.remove(lazy)


@pytest.mark.compile
@pytest.mark.slow
def test_inductor_kernels_match_eager_forward_and_backward(compile_on):
    for shape in [(4, 16, 8, 8), (2, 32, 4, 4)]:  # two shapes: the second is dynamic
        u = torch.randn(shape, requires_grad=True)
        x = torch.randn(shape, requires_grad=True)
        mu = torch.randn(shape[:2], requires_grad=True)
        sigma = (torch.rand(shape[:2]) + 0.3).requires_grad_()
        leaves = (u, x, mu, sigma)
        results = []
        for enabled in (True, False):
            torch_recal.set_compile(enabled)
            out = response_calibration_residual(u, x, mu, sigma) + response_calibration(
                u, mu, sigma, confidence="pdf"
            )
            grads = torch.autograd.grad(out.square().sum(), leaves)
            results.append((out.detach(), grads))
        (out_c, g_c), (out_e, g_e) = results
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_c, g_e, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.compile
@pytest.mark.slow
def test_inductor_batch_norm_and_gelu_double_backwards_match_eager(compile_on):
    from torch_recal._double_backward import (  # the module's documented test seam
        batch_norm_double_backward,
        batch_norm_double_backward_kernel,
        gelu_double_backward,
        gelu_double_backward_kernel,
    )

    for shape in [(8, 4, 6, 6), (16, 6)]:  # two shapes: the second is dynamic
        a, g, x = (torch.randn(shape) for _ in range(3))
        x = 2 * x + 3
        c = shape[1]
        mean, invstd, weight = torch.randn(c) + 3, torch.rand(c) + 0.3, torch.randn(c)
        compiled = batch_norm_double_backward_kernel(a, g, x, mean, invstd, weight)
        eager = batch_norm_double_backward(a, g, x, mean, invstd, weight)
        for got, want in zip(compiled, eager, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not batch_norm_double_backward_kernel.failed
    a, g, x = (3 * torch.randn(4, 5, 24) for _ in range(3))
    for approximate in ("none", "tanh"):
        compiled = gelu_double_backward_kernel(a, g, x, approximate)
        eager = gelu_double_backward(a, g, x, approximate)
        for got, want in zip(compiled, eager, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not gelu_double_backward_kernel.failed
