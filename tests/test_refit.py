"""pinv_refit_dense, NormalEquations, RandomLayerTraining against independent references.

References: scikit-learn ``Ridge`` (solver "svd" and "cholesky"), numpy least squares, and
hand formulas; never the library's own output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from torch import nn

from tests.distributed import needs_fsdp2, run_distributed
from torch_recal import NormalEquations, RandomLayerTraining, pinv_refit_dense
from torch_recal.refit import _gram_block

ROOT = Path(__file__).resolve().parents[1]


def _data(n=600, d=12, k=4, seed=0, scales=None, offset=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    if scales is not None:
        h = h * scales
    h = h + offset
    y = (h @ torch.randn(d, k, generator=g, dtype=torch.float64)).argmax(1)
    y[:k] = torch.arange(k)  # every class present
    return h.to(dtype), y


def _loader(h, y, batch_size):
    return [(h[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def _onehot(y, k):
    return np.eye(k)[y.numpy()]


def _rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


def _params(layer):
    return [p.detach().clone() for p in layer.parameters()]


def _unchanged(layer, before):
    return all(torch.equal(p, q) for p, q in zip(layer.parameters(), before, strict=True))


# ---------------------------------------------------------------------------------------------
# the solve equals scikit-learn / numpy


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 10.0])
@pytest.mark.parametrize("targets", ["onehot", "bipolar"])
def test_refit_matches_sklearn_ridge_with_unpenalised_intercept(ridge, targets):
    h, y = _data()
    fc = nn.Linear(12, 4).double()
    res = pinv_refit_dense(fc, _loader(h, y, 64), ridge=ridge, targets=targets)
    t = _onehot(y, 4)
    if targets == "bipolar":
        t = 2 * t - 1
    for solver in ("svd", "cholesky"):
        sk = Ridge(alpha=ridge, solver=solver).fit(h.numpy(), t)
        assert _rel(fc.weight.detach(), sk.coef_) < 1e-5
        assert _rel(fc.bias.detach(), sk.intercept_) < 1e-5
    # independent numpy normal equations: augmented [H 1], the bias row/col unpenalised
    ha = np.hstack([h.numpy(), np.ones((len(y), 1))])
    pen = ridge * np.eye(13)
    pen[-1, -1] = 0.0
    sol = np.linalg.solve(ha.T @ ha + pen, ha.T @ t)
    assert _rel(fc.weight.detach(), sol[:-1].T) < 1e-5
    assert _rel(fc.bias.detach(), sol[-1]) < 1e-5
    # result fields against explicit computations
    pred = h.numpy() @ sk.coef_.T + sk.intercept_
    assert res.mse == pytest.approx(((pred - t) ** 2).mean(), rel=1e-6, abs=1e-12)
    assert res.accuracy == pytest.approx((pred.argmax(1) == y.numpy()).mean())
    assert res.num_samples == 600
    assert res.solver == "cholesky"
    assert torch.equal(res.weight, fc.weight)


def test_refit_badly_scaled_features_with_large_offset():
    scales = torch.logspace(-3, 3, 12, dtype=torch.float64)
    h, y = _data(scales=scales, offset=1e3)
    fc = nn.Linear(12, 4).double()
    pinv_refit_dense(fc, _loader(h, y, 100), ridge=1e-3)
    sk = Ridge(alpha=1e-3, solver="svd").fit(h.numpy(), _onehot(y, 4))
    assert _rel(fc.weight.detach(), sk.coef_) < 1e-5
    assert _rel(fc.bias.detach(), sk.intercept_) < 1e-5


def test_refit_batch_size_does_not_change_result():
    h, y = _data(n=301)
    sk = Ridge(alpha=0.1, solver="svd").fit(h.numpy(), _onehot(y, 4))
    weights = []
    for bs in (1, 7, 64, 301):
        fc = nn.Linear(12, 4).double()
        pinv_refit_dense(fc, _loader(h, y, bs), ridge=0.1, evaluate=False)
        assert _rel(fc.weight.detach(), sk.coef_) < 1e-5
        weights.append(fc.weight.detach())
    for w in weights[1:]:
        assert torch.allclose(w, weights[0], rtol=0, atol=1e-10)


def test_refit_float32_layer_and_raw_targets_without_bias():
    h, _ = _data()
    g = torch.Generator().manual_seed(1)
    t = h @ torch.randn(12, 3, generator=g, dtype=torch.float64)
    fc = nn.Linear(12, 3, bias=False)  # float32 layer, float64 features
    res = pinv_refit_dense(fc, _loader(h, t, 50), ridge=0.5, targets="raw")
    sk = Ridge(alpha=0.5, fit_intercept=False, solver="svd").fit(h.numpy(), t.numpy())
    assert fc.weight.dtype == torch.float32
    assert _rel(fc.weight.detach(), sk.coef_) < 1e-6
    assert res.bias is None
    assert res.accuracy is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refit_half_precision_features_within_documented_tolerance(dtype):
    h, y = _data(n=800, d=16, dtype=dtype)
    fc = nn.Linear(16, 4)
    res = pinv_refit_dense(fc, _loader(h, y, 128), ridge=1e-2)
    assert torch.isfinite(res.weight).all()
    assert torch.isfinite(res.bias).all()
    # reference on the same (rounded) features in float64; documented: 1e-3 relative
    sk = Ridge(alpha=1e-2, solver="svd").fit(h.double().numpy(), _onehot(y, 4))
    assert _rel(fc.weight.detach(), sk.coef_) < 1e-3
    assert _rel(fc.bias.detach(), sk.intercept_) < 1e-3


def test_refit_logit_inverse_activation_matches_ridge_on_logit_targets():
    h, y = _data()
    fc = nn.Linear(12, 4).double()
    pinv_refit_dense(fc, _loader(h, y, 128), ridge=1.0, inverse_activation="logit")
    t = np.clip(_onehot(y, 4), 1e-3, 1 - 1e-3)
    sk = Ridge(alpha=1.0, solver="svd").fit(h.numpy(), np.log(t / (1 - t)))
    assert _rel(fc.weight.detach(), sk.coef_) < 1e-5


def test_refit_start_current_and_step_size_follow_the_update_rule():
    h, y = _data()
    t = _onehot(y, 4)
    fc = nn.Linear(12, 4).double()
    w0, b0 = fc.weight.detach().numpy().copy(), fc.bias.detach().numpy().copy()
    # start="current": ridge on the residual, W = W0 + delta, penalty on ||W - W0||
    pinv_refit_dense(fc, _loader(h, y, 100), ridge=2.0, start="current", step_size=0.5)
    resid = t - (h.numpy() @ w0.T + b0)
    sk = Ridge(alpha=2.0, solver="svd").fit(h.numpy(), resid)
    assert _rel(fc.weight.detach(), w0 + 0.5 * sk.coef_) < 1e-5
    assert _rel(fc.bias.detach(), b0 + 0.5 * sk.intercept_) < 1e-5
    # start="zero", step 0.5: halfway from the current weights to the ridge solution
    w1, b1 = fc.weight.detach().numpy().copy(), fc.bias.detach().numpy().copy()
    pinv_refit_dense(fc, _loader(h, y, 100), ridge=2.0, step_size=0.5)
    sk = Ridge(alpha=2.0, solver="svd").fit(h.numpy(), t)
    assert _rel(fc.weight.detach(), w1 + 0.5 * (sk.coef_ - w1)) < 1e-5
    assert _rel(fc.bias.detach(), b1 + 0.5 * (sk.intercept_ - b1)) < 1e-5


# ---------------------------------------------------------------------------------------------
# degenerate problems


def test_refit_rank_deficient_and_wide_give_minimum_norm_solution():
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200, 5, generator=g, dtype=torch.float64)
    h = torch.cat([base, base[:, :3] * 2.0, base[:, :2] - base[:, 2:4]], 1)  # rank 5 of 10
    y = torch.randint(0, 3, (200,), generator=g)
    wide = torch.randn(30, 50, generator=g, dtype=torch.float64)  # d > N
    y_wide = torch.randint(0, 3, (30,), generator=g)
    for feats, labels in ((h, y), (wide, y_wide)):
        fc = nn.Linear(feats.shape[1], 3).double()
        res = pinv_refit_dense(fc, _loader(feats, labels, 16), ridge=0.0)
        assert res.solver == "eigh"
        assert torch.isfinite(fc.weight).all()
        hc = feats.numpy() - feats.numpy().mean(0)
        t = _onehot(labels, 3)
        ref = np.linalg.lstsq(hc, t - t.mean(0), rcond=None)[0]  # minimum-norm
        assert _rel(fc.weight.detach(), ref.T) < 1e-6
        assert _rel(fc.bias.detach(), t.mean(0) - feats.numpy().mean(0) @ ref) < 1e-6


def test_refit_single_sample_and_single_class():
    fc = nn.Linear(6, 3).double()
    h = torch.randn(1, 6, dtype=torch.float64)
    res = pinv_refit_dense(fc, [(h, torch.tensor([2]))], ridge=1e-3)
    # one sample: centred data are zero, so W = 0 and b = t (sklearn agrees)
    assert torch.equal(res.weight, torch.zeros(3, 6, dtype=torch.float64))
    assert torch.allclose(res.bias, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert res.mse == pytest.approx(0.0, abs=1e-12)
    assert res.accuracy == 1.0
    h, _ = _data(n=50, d=6)
    res = pinv_refit_dense(fc, _loader(h, torch.zeros(50, dtype=torch.long), 8), ridge=1e-3)
    assert torch.allclose(res.weight, torch.zeros(3, 6, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(res.bias, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------
# model path


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 10)
    ).double()


def test_refit_model_path_equals_feature_path_and_removes_hook():
    model = _small_model()
    model.train()
    fc = model[-1]
    x = torch.randn(90, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (90,))
    with torch.no_grad():
        model.eval()
        feats = model[:-1](x)
        model.train()
    res = pinv_refit_dense(fc, _loader(x, y, 32), model=model, ridge=0.1)
    sk = Ridge(alpha=0.1, solver="svd").fit(feats.numpy(), _onehot(y, 10))
    assert _rel(fc.weight.detach(), sk.coef_) < 1e-5
    assert res.num_samples == 90
    assert model.training  # mode restored
    assert not fc._forward_pre_hooks
    assert not fc._forward_hooks
    # an error midway (labels out of range in the second batch): hook gone, weights untouched
    before = _params(fc)
    y_bad = y.clone()
    y_bad[40] = 10
    with pytest.raises(ValueError, match="labels must lie in"):
        pinv_refit_dense(fc, _loader(x, y_bad, 32), model=model)
    assert not fc._forward_pre_hooks
    assert _unchanged(fc, before)
    assert model.training


def test_refit_stack_of_dense_layers_matches_layerwise_references():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(400, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (400,), generator=g)
    stack = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    w1, b1 = stack[2].weight.detach().numpy().copy(), stack[2].bias.detach().numpy().copy()
    res = pinv_refit_dense(stack, _loader(h, y, 64), ridge=0.5)
    t = _onehot(y, 3)
    # layer 0: target pulled back through the ridge pseudo-inverse of layer 1, then atanh
    a = (t - b1) @ w1 @ np.linalg.inv(w1.T @ w1 + (0.5 + 1e-12) * np.eye(6))
    a0 = np.arctanh(np.clip(a, -1 + 1e-3, 1 - 1e-3))
    sk0 = Ridge(alpha=0.5, solver="svd").fit(h.numpy(), a0)
    assert _rel(stack[0].weight.detach(), sk0.coef_) < 1e-5
    # layer 1: plain ridge on the features of the refitted layer 0
    hid = np.tanh(h.numpy() @ sk0.coef_.T + sk0.intercept_)
    sk1 = Ridge(alpha=0.5, solver="svd").fit(hid, t)
    assert _rel(stack[2].weight.detach(), sk1.coef_) < 1e-5
    assert len(res.layers) == 2
    assert torch.equal(res.weight, stack[2].weight)


# ---------------------------------------------------------------------------------------------
# bad input


def test_refit_bad_input_raises_and_leaves_weights_untouched():
    h, y = _data(n=64)
    fc = nn.Linear(12, 4).double()
    before = _params(fc)
    h_nan = h.clone()
    h_nan[40, 3] = float("nan")
    cases = [
        ([], {}, "no samples"),
        (_loader(h_nan, y, 32), {}, "inf or nan"),
        (_loader(h[:, :10], y, 32), {}, r"shape \(n, 12\)"),
        (_loader(h, y + 4, 32), {}, "labels must lie in"),
        (_loader(h, y, 32), {"ridge": -1.0}, "ridge"),
        (_loader(h, y, 32), {"targets": "soft"}, "targets"),
        (_loader(h, y, 32), {"step_size": 0.0}, "step_size"),
        (_loader(h, y, 32), {"start": "random"}, "start"),
        (_loader(h, y, 32), {"num_classes": 5}, "num_classes"),
        (_loader(h, y, 32), {"inverse_activation": "softmax"}, "inverse_activation"),
        (_loader(h, y.float(), 32), {}, "integer class indices"),
    ]
    for loader, kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            pinv_refit_dense(fc, loader, **kwargs)
        assert _unchanged(fc, before), match
    with pytest.raises(TypeError, match=r"nn\.Linear"):
        pinv_refit_dense(nn.Conv2d(1, 1, 1), _loader(h, y, 32))
    with pytest.raises(TypeError, match="pairs"):
        pinv_refit_dense(fc, [h])
    with pytest.raises(ValueError, match="num_features"):
        NormalEquations(0, 3)


# ---------------------------------------------------------------------------------------------
# the accumulator


def test_normal_equations_resume_merge_and_no_intercept():
    h, y = _data(n=500, offset=50.0)
    t = torch.from_numpy(_onehot(y, 4))
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
        assert _rel(sol.weight, sk.coef_) < 1e-6
        assert _rel(sol.bias, sk.intercept_) < 1e-6
        # residual sum of squares from the statistics equals the explicit one
        pred = h.numpy() @ sk.coef_.T + sk.intercept_
        rss = ((pred - t.numpy()) ** 2).sum()
        assert acc.residual_sum_of_squares(sol.weight, sol.bias) == pytest.approx(rss, rel=1e-6)
    acc = NormalEquations(12, 4, fit_intercept=False)
    acc.update(h, t)
    sk = Ridge(alpha=3.0, fit_intercept=False, solver="svd").fit(h.numpy(), t.numpy())
    sol = acc.solve(3.0)
    assert sol.bias is None
    assert _rel(sol.weight, sk.coef_) < 1e-6
    bad = h[:10].clone()
    bad[3, 2] = float("inf")
    with pytest.raises(ValueError, match="inf or nan"):
        acc.update(bad, t[:10])
    bad_t = t[:10].clone()
    bad_t[2, 1] = float("nan")  # without intercept there is no target mean to catch it
    with pytest.raises(ValueError, match="inf or nan"):
        acc.update(h[:10], bad_t)
    assert acc.count == 500  # neither bad batch was accumulated
    assert _rel(acc.solve(3.0).weight, sk.coef_) < 1e-6
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
                assert _rel(acc.s_hh, seen.T @ seen) < tol
        c_h = ref_h - ref_h.mean(0) if fit_intercept else ref_h
        c_t = ref_t - ref_t.mean(0) if fit_intercept else ref_t
        assert torch.equal(acc.s_hh, acc.s_hh.T)
        assert _rel(acc.s_hh, c_h.T @ c_h) < tol
        assert _rel(acc.s_ht, c_h.T @ c_t) < tol
        sk = Ridge(alpha=0.5, fit_intercept=fit_intercept, solver="svd").fit(ref_h, ref_t)
        assert _rel(acc.solve(0.5).weight, sk.coef_) < 50 * tol


def test_normal_equations_multithreaded_block_rule_matches_numpy() -> None:
    # with 2 threads, d = 300 uses 128-row blocks (128, 128 and a partial 44)
    g = torch.Generator().manual_seed(4)
    h = torch.randn(500, 300, generator=g, dtype=torch.float64) + 3.0
    t = torch.randn(500, 2, generator=g, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert _gram_block(300) == 128
        acc = NormalEquations(300, 2)
        for i in range(0, 500, 200):
            acc.update(h[i : i + 200], t[i : i + 200])
    finally:
        torch.set_num_threads(threads)
    c = h.numpy() - h.numpy().mean(0)
    assert _rel(acc.s_hh, c.T @ c) < 1e-12


# ---------------------------------------------------------------------------------------------
# distributed


def _dist_worker(rank, world_size, h, y):
    from torch_recal import NormalEquations, RandomLayerTraining, pinv_refit_dense

    shard = slice(0, 130) if rank == 0 else slice(130, None)  # unequal shards
    fc = nn.Linear(h.shape[1], 4).double()
    hs, ys = h[shard], y[shard]
    loader = [(hs[i : i + 32], ys[i : i + 32]) for i in range(0, len(ys), 32)]
    res = pinv_refit_dense(fc, loader, ridge=1e-2)
    acc = NormalEquations(h.shape[1], 4)
    acc.update(hs, torch.nn.functional.one_hot(ys, 4).double())
    acc.all_reduce()
    rlt = RandomLayerTraining([nn.Linear(2, 2) for _ in range(6)], seed=None)
    draws = [rlt.trainable]
    for _ in range(4):
        rlt.step()
        draws.append(rlt.trainable)
    return {
        "weight": res.weight,
        "bias": res.bias,
        "n": res.num_samples,
        "acc": res.accuracy,
        "acc_count": acc.count,
        "seed": rlt.seed,
        "draws": draws,
    }


@pytest.mark.distributed
def test_refit_distributed_equals_single_process_on_the_union():
    h, y = _data(n=300, offset=10.0)
    out = run_distributed(_dist_worker, h, y)
    sk = Ridge(alpha=1e-2, solver="svd").fit(h.numpy(), _onehot(y, 4))
    for r in out:
        assert r["n"] == 300
        assert r["acc_count"] == 300
        assert _rel(r["weight"], sk.coef_) < 1e-8
        assert _rel(r["bias"], sk.intercept_) < 1e-8
    assert torch.equal(out[0]["weight"], out[1]["weight"])
    assert out[0]["acc"] == out[1]["acc"]
    assert out[0]["seed"] == out[1]["seed"]
    assert out[0]["draws"] == out[1]["draws"]


def _fsdp_refit_worker(rank, world_size, x, y):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from torch_recal import pinv_refit_dense

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 4)).double()
    fully_shard(model[0])
    fully_shard(model)  # the head is managed by the root, whose gathered copies outlive no_grad
    # FSDP's forward is itself a collective: every rank runs the same number of batches
    shard = slice(0, 115) if rank == 0 else slice(115, None)
    xs, ys = x[shard], y[shard]
    loader = [(xs[i : i + 25], ys[i : i + 25]) for i in range(0, len(ys), 25)]
    res = pinv_refit_dense(model[2], loader, model=model, ridge=1e-2)
    head = model[2]
    out = {
        "is_dtensor": isinstance(head.weight, DTensor) and isinstance(head.bias, DTensor),
        "weight": head.weight.detach().full_tensor(),
        "bias": head.bias.detach().full_tensor(),
        "result_weight": res.weight,
        "n": res.num_samples,
    }
    with torch.no_grad():
        w1, b1 = (p.full_tensor() for p in model[0].parameters())
        out["features"] = torch.tanh(torch.nn.functional.linear(x, w1, b1))
        out["logits"] = model(x)  # the sharded head is what the model uses
    return out


@pytest.mark.distributed
@needs_fsdp2
def test_refit_under_fsdp2_writes_the_shards_and_equals_the_union():
    h, y = _data(n=230, d=6)
    out = run_distributed(_fsdp_refit_worker, h, y)
    feats = out[0]["features"].numpy()
    sk = Ridge(alpha=1e-2, solver="svd").fit(feats, _onehot(y, 4))
    for r in out:
        assert r["is_dtensor"] and r["n"] == 230
        assert _rel(r["weight"], sk.coef_) < 1e-8  # the shards hold the refit, not stale values
        assert _rel(r["bias"], sk.intercept_) < 1e-8
        assert _rel(r["result_weight"], sk.coef_) < 1e-8
        assert _rel(r["logits"], feats @ sk.coef_.T + sk.intercept_) < 1e-8  # and it is used


def _fsdp_random_layers_worker(rank, world_size):
    from torch.distributed.fsdp import fully_shard

    from torch_recal import RandomLayerTraining

    torch.manual_seed(0)
    layers = [nn.Linear(8, 8) for _ in range(4)]
    model = nn.Sequential(*[m for lin in layers for m in (lin, nn.ReLU())], nn.Linear(8, 3))
    for lin in layers:
        fully_shard(lin)
    fully_shard(model)
    rlt = RandomLayerTraining(layers, seed=None)  # the choice is broadcast from rank 0
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(rank))
    out = []
    for _ in range(4):
        rlt.step()
        before = [lin.weight.detach().full_tensor().clone() for lin in layers]
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
        moved = [
            not torch.equal(lin.weight.detach().full_tensor(), b)
            for lin, b in zip(layers, before, strict=True)
        ]
        out.append((list(rlt.trainable), moved))
    return out


@pytest.mark.distributed
@needs_fsdp2
def test_random_layer_training_under_fsdp2_freezes_exactly_the_chosen_layers():
    r0, r1 = run_distributed(_fsdp_random_layers_worker)
    assert r0 == r1  # the same choice on every rank
    for trainable, moved in r0:
        assert moved == trainable  # frozen shards stay, trainable ones take the step
    assert len({tuple(t) for t, _ in r0}) > 1  # the choice changes between epochs


def _dist_failure_worker(rank, world_size, h, y):
    import time

    from torch_recal import pinv_refit_dense

    shard = slice(0, 130) if rank == 0 else slice(130, None)
    hs, ys = h[shard].clone(), y[shard]
    if rank == 1:
        hs[40, 3] = float("nan")  # bad data on one rank only
    loader = [(hs[i : i + 32], ys[i : i + 32]) for i in range(0, len(ys), 32)]
    fc = nn.Linear(h.shape[1], 4).double()
    before = [p.detach().clone() for p in fc.parameters()]
    t0 = time.perf_counter()
    try:
        pinv_refit_dense(fc, loader, ridge=1e-2)
        raised = None
    except Exception as err:
        raised = (type(err).__name__, str(err))
    untouched = all(torch.equal(p, q) for p, q in zip(fc.parameters(), before, strict=True))
    return {"raised": raised, "untouched": untouched, "seconds": time.perf_counter() - t0}


@pytest.mark.distributed
def test_refit_distributed_error_on_one_rank_stops_every_rank():
    h, y = _data(n=300)
    out = run_distributed(_dist_failure_worker, h, y, timeout_s=30.0)
    assert out[1]["raised"][0] == "ValueError" and "inf or nan" in out[1]["raised"][1]
    assert out[0]["raised"][0] == "RuntimeError"
    assert "failed on another rank" in out[0]["raised"][1]
    assert "rank 1: ValueError" in out[0]["raised"][1] and "inf or nan" in out[0]["raised"][1]
    assert all(r["untouched"] for r in out)
    assert all(r["seconds"] < 25.0 for r in out)  # nobody waited for the collective timeout


# ---------------------------------------------------------------------------------------------
# RandomLayerTraining


def test_random_layer_training_trains_a_suffix_and_stops_backward_early():
    torch.manual_seed(0)
    net = nn.Sequential(*[nn.Linear(4, 4) for _ in range(5)])
    rlt = RandomLayerTraining(list(net), min_trainable=2, seed=7)
    counts = set()
    for _ in range(30):
        m = sum(rlt.trainable)
        counts.add(m)
        assert 2 <= m <= 5
        assert rlt.trainable == [i >= 5 - m for i in range(5)]  # the last m layers
        net.zero_grad(set_to_none=True)
        net(torch.randn(3, 4)).sum().backward()
        for layer, on in zip(net, rlt.trainable, strict=True):
            assert (layer.weight.grad is not None) == on
        rlt.step()
    assert counts == {2, 3, 4, 5}  # every allowed count occurs


def test_random_layer_training_paper_schedule_resume_and_restore():
    layers = [nn.Linear(2, 2) for _ in range(8)]
    layers[0].bias.requires_grad_(False)  # frozen by the user: stays frozen
    rlt = RandomLayerTraining(layers, seed=3, schedule=RandomLayerTraining.PAPER_SCHEDULE)
    frozen_counts, history = [], []
    for _ in range(10):
        frozen_counts.append(8 - sum(rlt.trainable))
        history.append(rlt.trainable)
        for layer, on in zip(layers, rlt.trainable, strict=True):
            assert layer.weight.requires_grad == on
        assert not layers[0].bias.requires_grad
        rlt.step()
    # round((1 - r_a) * 8) frozen, r_a = [1, 1, .75, .75, .5, .5, .25, .25], then kept
    assert frozen_counts == [0, 0, 2, 2, 4, 4, 6, 6, 6, 6]
    assert len({tuple(t) for t in history[6:]}) > 1  # re-drawn every epoch
    # resume from epoch 4 repeats the uninterrupted run
    other = RandomLayerTraining([nn.Linear(2, 2) for _ in range(8)], seed=99)
    state = rlt.state_dict()
    state["epoch"] = 4
    other.load_state_dict(state)
    replay = []
    for _ in range(6):
        replay.append(other.trainable)
        other.step()
    assert replay == history[4:]
    rlt.restore()
    assert all(p.requires_grad for m in layers[1:] for p in m.parameters())
    assert not layers[0].bias.requires_grad
    with pytest.raises(ValueError, match="min_trainable"):
        RandomLayerTraining(layers, min_trainable=9)
    with pytest.raises(ValueError, match="schedule"):
        RandomLayerTraining(layers, schedule=[1.5])
    with pytest.raises(TypeError, match="sequence of modules"):
        RandomLayerTraining(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# example


@pytest.mark.slow
def test_refit_example_smoke_runs_fast(tmp_path):
    script = ROOT / "examples" / "refit.py"
    if not script.exists():
        pytest.skip("examples/refit.py not written yet")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_RECAL_COMPILE": "0"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(script), "--smoke", "--no-progress", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert time.perf_counter() - start < 20
    assert "refit" in proc.stdout
    assert list(tmp_path.glob("*.png"))
