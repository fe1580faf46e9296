"""NormalEquations (torch_recal.ridge) against independent references.

References: scikit-learn ``Ridge`` (solver "svd"), numpy Gram products and least squares;
never the library's own output.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from tests.lstsq_data import make_data, onehot, rel
from torch_recal import NormalEquations
from torch_recal.ridge import gram_block_rows


def test_normal_equations_resume_merge_and_no_intercept():
    h, y = make_data(n=500, offset=50.0)
    t = torch.from_numpy(onehot(y, 4))
    full = NormalEquations(12, 4)
    full.update(h, t)
    # half-finished accumulation, saved and resumed in a fresh object
    first = NormalEquations(12, 4)
    for i in range(0, 250, 50):
        first.update(h[i : i + 50], t[i : i + 50])
    resumed = NormalEquations(12, 4)
    resumed.load_state_dict(first.state_dict())
    for i in range(250, 500, 50):
        resumed.update(h[i : i + 50], t[i : i + 50])
    second = NormalEquations(12, 4)
    second.update(h[250:], t[250:])
    merged = NormalEquations(12, 4)
    merged.load_state_dict(first.state_dict())
    merged.merge(second)
    sk = Ridge(alpha=3.0, solver="svd").fit(h.numpy(), t.numpy())
    for acc in (full, resumed, merged):
        sol = acc.solve(3.0)
        assert acc.count == 500
        assert rel(sol.weight, sk.coef_) < 1e-6
        assert rel(sol.bias, sk.intercept_) < 1e-6
        # residual sum of squares from the statistics equals the explicit one
        pred = h.numpy() @ sk.coef_.T + sk.intercept_
        rss = ((pred - t.numpy()) ** 2).sum()
        assert acc.residual_sum_of_squares(sol.weight, sol.bias) == pytest.approx(rss, rel=1e-6)
    acc = NormalEquations(12, 4, fit_intercept=False)
    acc.update(h, t)
    sk = Ridge(alpha=3.0, fit_intercept=False, solver="svd").fit(h.numpy(), t.numpy())
    sol = acc.solve(3.0)
    assert sol.bias is None
    assert rel(sol.weight, sk.coef_) < 1e-6
    bad = h[:10].clone()
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="inf or nan"):
        acc.update(bad, t[:10])
    bad_t = t[:10].clone()
    bad_t[2, 1] = float("nan")  # without intercept there is no target mean to catch it
    with pytest.raises(ValueError, match="inf or nan"):
        acc.update(h[:10], bad_t)
    assert acc.count == 500  # neither bad batch was accumulated
    assert rel(acc.solve(3.0).weight, sk.coef_) < 1e-6
    acc.reset()
    assert acc.count == 0
    with pytest.raises(ValueError, match="no samples"):
        acc.solve(1.0)
    with pytest.raises(ValueError, match="state is for"):
        NormalEquations(3, 4).load_state_dict(first.state_dict())


@pytest.mark.parametrize("fit_intercept", [True, False])
def test_normal_equations_wide_features_use_the_symmetric_blocks_exactly(fit_intercept):
    # d = 150 spans three block rows of the lower-triangle Gram (64, 64 and a partial 22);
    # the statistics are read half-way (mirroring the upper triangle) and accumulation goes on
    g = torch.Generator().manual_seed(3)
    h64 = torch.randn(700, 150, generator=g, dtype=torch.float64) * 2.0 + 5.0
    t64 = torch.randn(700, 3, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
        h, t = h64.to(dtype), t64.to(dtype)
        ref_h, ref_t = h.double().numpy(), t.double().numpy()
        acc = NormalEquations(150, 3, fit_intercept=fit_intercept)
        for i in range(0, 700, 128):
            acc.update(h[i : i + 128], t[i : i + 128])
            if i == 256:
                seen = ref_h[: i + 128] - (ref_h[: i + 128].mean(0) if fit_intercept else 0)
                assert rel(acc.s_hh, seen.T @ seen) < tol
        c_h = ref_h - ref_h.mean(0) if fit_intercept else ref_h
        c_t = ref_t - ref_t.mean(0) if fit_intercept else ref_t
        assert torch.equal(acc.s_hh, acc.s_hh.T)
        assert rel(acc.s_hh, c_h.T @ c_h) < tol
        assert rel(acc.s_ht, c_h.T @ c_t) < tol
        sk = Ridge(alpha=0.5, fit_intercept=fit_intercept, solver="svd").fit(ref_h, ref_t)
        assert rel(acc.solve(0.5).weight, sk.coef_) < 50 * tol


def test_normal_equations_multithreaded_block_rule_matches_numpy():
    # with 2 threads, d = 300 uses 128-row blocks (128, 128 and a partial 44)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(500, 300, generator=g, dtype=torch.float64) + 3.0
    t = torch.randn(500, 2, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert gram_block_rows(300) == 128
        acc = NormalEquations(300, 2)
        for i in range(0, 500, 200):
            acc.update(h[i : i + 200], t[i : i + 200])
    finally:
        torch.set_num_threads(threads)
    c = h.numpy() - h.numpy().mean(0)
    assert rel(acc.s_hh, c.T @ c) < 1e-12


def test_integer_targets_give_the_float_targets_solution():
    h, y = make_data(n=200)
    t = torch.nn.functional.one_hot(y, 4)  # int64, as one_hot returns it
    acc = NormalEquations(12, 4)
    acc.update(h, t)
    sk = Ridge(alpha=0.5, solver="svd").fit(h.numpy(), onehot(y, 4))
    sol = acc.solve(0.5)
    assert rel(sol.weight, sk.coef_) < 1e-8
    assert rel(sol.bias, sk.intercept_) < 1e-8


def test_solver_fallback_is_logged_and_the_cholesky_path_is_quiet(caplog):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(100, 3, generator=g, dtype=torch.float64)
    t = torch.randn(100, 2, generator=g, dtype=torch.float64)
    acc = NormalEquations(3, 2)
    acc.update(base, t)
    with caplog.at_level(logging.INFO, logger="torch_recal"):
        assert acc.solve(0.1).solver == "cholesky"
    assert not caplog.records
    singular = NormalEquations(4, 2)
    singular.update(torch.cat([base, base[:, :1]], 1), t)  # a repeated column: rank 3 of 4
    with caplog.at_level(logging.INFO, logger="torch_recal"):
        sol = singular.solve(0.0)
    assert sol.solver == "eigh"
    (record,) = caplog.records
    assert record.name == "torch_recal" and record.levelno == logging.WARNING
    assert "eigendecomposition" in record.getMessage()
    # the fallback's minimum-norm answer: numpy's lstsq on the centred system
    hc = torch.cat([base, base[:, :1]], 1).numpy()
    hc = hc - hc.mean(0)
    ref = np.linalg.lstsq(hc, t.numpy() - t.numpy().mean(0), rcond=None)[0]
    assert rel(sol.weight, ref.T) < 1e-8


def test_load_state_dict_takes_what_state_dict_gave_through_torch_save(tmp_path):
    h, y = make_data(n=90, offset=3.0)
    t = torch.from_numpy(onehot(y, 4))
    acc = NormalEquations(12, 4)
    acc.update(h[:40], t[:40])
    torch.save(acc.state_dict(), tmp_path / "ne.pt")
    other = NormalEquations(12, 4)
    other.load_state_dict(torch.load(tmp_path / "ne.pt", weights_only=True))
    assert other.count == 40
    for piece in (acc, other):
        piece.update(h[40:], t[40:])
    c = h.numpy() - h.numpy().mean(0)
    assert rel(other.s_hh, c.T @ c) < 1e-12
    assert torch.equal(other.s_hh, acc.s_hh) and torch.equal(other.s_ht, acc.s_ht)


def test_a_rare_feature_with_a_ridge_stays_on_the_cholesky_path(caplog):
    """A feature that is non-zero in one sample (a ReLU unit that almost never fires) has a
    tiny variance; with a ridge the system is well-conditioned and needs no fallback (the
    Jacobi scaling must be that of ``S_hh + ridge I``, not of ``S_hh`` alone)."""
    g = torch.Generator().manual_seed(4)
    h = torch.randn(400, 12, generator=g, dtype=torch.float64)
    rare = torch.zeros(400, 1, dtype=torch.float64)
    rare[7] = 1e-5
    h = torch.cat([h, rare], 1)
    y = torch.randint(0, 4, (400,), generator=g)
    acc = NormalEquations(13, 4)
    acc.update(h, torch.from_numpy(onehot(y, 4)))
    for ridge in (1e-3, 10.0, 1e4):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="torch_recal"):
            sol = acc.solve(ridge)
        assert sol.solver == "cholesky" and not caplog.records, ridge
        assert sol.condition < 1e6
        sk = Ridge(alpha=ridge, solver="svd").fit(h.numpy(), onehot(y, 4))
        assert rel(sol.weight, sk.coef_) < 1e-8
        assert rel(sol.bias, sk.intercept_) < 1e-8
