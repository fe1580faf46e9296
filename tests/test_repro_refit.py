"""The refit protocol's helpers (examples/repro/refit.py) against independent references.

``refit_grid`` (one accumulation of the normal equations, every ridge of a grid) against
``pinv_refit_dense`` called once per ridge and, for the plain ridge solution, against
scikit-learn's ``Ridge`` on the materialised features; ``lbfgs_probe`` against scikit-learn
fitted directly; ``first_reach`` against a plain search with numpy.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from repro import refit as proto  # noqa: E402

from torch_recal import pinv_refit_dense  # noqa: E402


def _problem(seed: int = 0, n: int = 600, d: int = 24, k: int = 5):
    g = torch.Generator().manual_seed(seed)
    h = torch.relu(torch.randn(n, d, generator=g) + 0.3)  # post-ReLU: a large mean, zeros
    w = torch.randn(d, k, generator=g)
    y = (h @ w + 0.8 * torch.randn(n, k, generator=g)).argmax(1)
    return h[:400], y[:400], h[400:], y[400:]


def _layer(d: int = 24, k: int = 5, seed: int = 1) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, k)


RIDGES = (1e-3, 1.0, 30.0, 1e3)


@pytest.mark.parametrize(("start", "step"), [("zero", 1.0), ("current", 0.5), ("zero", 0.5)])
def test_refit_grid_equals_pinv_refit_dense_per_ridge(start: str, step: float):
    h, y, hv, vy = _problem()
    fc = _layer()
    w_before = fc.weight.detach().clone()
    out = proto.refit_grid(fc, h, y, hv, vy, RIDGES, start=start, step_size=step, assign=False)
    assert torch.equal(fc.weight, w_before)  # assign=False leaves the layer alone
    loader = [(h[i : i + 128], y[i : i + 128]) for i in range(0, len(y), 128)]
    scores = {}
    for ridge in RIDGES:
        ref = pinv_refit_dense(
            fc, loader, ridge=ridge, start=start, step_size=step, assign=False, evaluate=False
        )
        logits = hv @ ref.weight.T + ref.bias
        scores[f"{ridge:g}"] = float((logits.argmax(1) == vy).double().mean())
        if ridge == out["ridge"]:
            torch.testing.assert_close(out["weight"], ref.weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(out["bias"], ref.bias, rtol=1e-5, atol=1e-6)
    assert out["val_by_ridge"] == pytest.approx(scores, abs=1e-12)
    best = max(scores.values())
    first = next(r for r in RIDGES if scores[f"{r:g}"] == best)  # the first of equals
    assert out["ridge"] == first and out["val_acc"] == best
    change = float((out["weight"].double() - w_before.double()).norm() / w_before.norm())
    assert out["rel_change"] == pytest.approx(change, rel=1e-6)


def test_refit_grid_is_sklearn_ridge_and_assigns():
    sklearn = pytest.importorskip("sklearn.linear_model")
    h, y, hv, vy = _problem(seed=3)
    fc = _layer()
    out = proto.refit_grid(fc, h, y, hv, vy, (0.5,))
    t = np.eye(5)[y.numpy()]
    ref = sklearn.Ridge(alpha=0.5, fit_intercept=True).fit(h.double().numpy(), t)
    np.testing.assert_allclose(fc.weight.detach().double().numpy(), ref.coef_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fc.bias.detach().double().numpy(), ref.intercept_, rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    assert torch.equal(fc.weight, out["weight"])


def test_lbfgs_probe_is_sklearn_fitted_directly_with_the_best_c():
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression

    h, y, hv, vy = _problem(seed=5)
    cs = (1e-3, 1e-1, 10.0)
    est, info = proto.lbfgs_probe(h, y, hv, vy, cs, max_iter=300)
    scores = {}
    for c in cs:
        ref = LogisticRegression(solver="lbfgs", C=c, max_iter=300)
        ref.fit(h.numpy(), y.numpy())
        scores[f"{c:g}"] = float((ref.predict(hv.numpy()) == vy.numpy()).mean())
        if c == info["C"]:
            np.testing.assert_allclose(est.coef_, ref.coef_, rtol=1e-10)
            np.testing.assert_array_equal(est.predict(hv.numpy()), ref.predict(hv.numpy()))
    assert info["val_by_C"] == scores
    best = max(scores.values())
    assert info["C"] == next(c for c in cs if scores[f"{c:g}"] == best)
    assert info["val_acc"] == best and info["converged"] == (info["n_iter"] < 300)


def test_first_reach_is_the_first_epoch_at_or_above_the_target():
    rng = np.random.default_rng(0)
    for _ in range(200):
        accs = rng.uniform(0.5, 1.0, size=rng.integers(1, 8))
        cpus = np.cumsum(rng.uniform(1, 3, size=len(accs)))
        target = float(rng.uniform(0.5, 1.05))
        curve = [{"epoch": i + 1, "cpu": float(c), "acc": float(a)}
                 for i, (c, a) in enumerate(zip(cpus, accs, strict=True))]  # fmt: skip
        hit = np.flatnonzero(accs >= target)
        expected = (float(cpus[hit[0]]), int(hit[0]) + 1) if len(hit) else (None, None)
        assert proto.first_reach(curve, target) == expected


def test_features_are_the_head_input():
    torch.manual_seed(0)
    model = proto.mlp(16)
    x = torch.randn(7, 1, 28, 28)
    captured = []
    handle = proto.head(model).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model.train()
    with torch.no_grad():
        model(x)
    handle.remove()
    torch.testing.assert_close(proto.features(model, x), captured[0])
    assert model.training
