"""pinv_refit_dense against independent references.

References: scikit-learn ``Ridge`` (solver "svd" and "cholesky"), numpy least squares, and
hand formulas; never the library's own output.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from torch import nn

from tests.distributed import needs_fsdp2, run_distributed
from tests.lstsq_data import OnePass, batches, make_data, onehot, rel
from torch_recal import pinv_refit_dense

ROOT = Path(__file__).resolve().parents[1]


def _params(layer):
    return [p.detach().clone() for p in layer.parameters()]


def _unchanged(layer, before):
    return all(torch.equal(p, q) for p, q in zip(layer.parameters(), before, strict=True))


# ---------------------------------------------------------------------------------------------
# the solve equals scikit-learn / numpy


@pytest.mark.parametrize("ridge", [0.0, 1e-3, 10.0])
@pytest.mark.parametrize("targets", ["onehot", "bipolar"])
def test_refit_matches_sklearn_ridge_with_unpenalised_intercept(ridge, targets):
    h, y = make_data()
    fc = nn.Linear(12, 4).double()
    res = pinv_refit_dense(fc, batches(h, y, 64), ridge=ridge, targets=targets)
    t = onehot(y, 4)
    if targets == "bipolar":
        t = 2 * t - 1
    for solver in ("svd", "cholesky"):
        sk = Ridge(alpha=ridge, solver=solver).fit(h.numpy(), t)
        assert rel(fc.weight.detach(), sk.coef_) < 1e-5
        assert rel(fc.bias.detach(), sk.intercept_) < 1e-5
    # independent numpy normal equations: augmented [H 1], the bias row/col unpenalised
    ha = np.hstack([h.numpy(), np.ones((len(y), 1))])
    pen = ridge * np.eye(13)
    pen[-1, -1] = 0.0
    sol = np.linalg.solve(ha.T @ ha + pen, ha.T @ t)
    assert rel(fc.weight.detach(), sol[:-1].T) < 1e-5
    assert rel(fc.bias.detach(), sol[-1]) < 1e-5
    # result fields against explicit computations
    pred = h.numpy() @ sk.coef_.T + sk.intercept_
    assert res.mse == pytest.approx(((pred - t) ** 2).mean(), rel=1e-6, abs=1e-12)
    assert res.accuracy == pytest.approx((pred.argmax(1) == y.numpy()).mean())
    assert res.num_samples == 600
    assert res.solver == "cholesky"
    assert torch.equal(res.weight, fc.weight)


def test_refit_badly_scaled_features_with_large_offset():
    scales = torch.logspace(-3, 3, 12, dtype=torch.float64)
    h, y = make_data(scales=scales, offset=1e3)
    fc = nn.Linear(12, 4).double()
    pinv_refit_dense(fc, batches(h, y, 100), ridge=1e-3)
    sk = Ridge(alpha=1e-3, solver="svd").fit(h.numpy(), onehot(y, 4))
    assert rel(fc.weight.detach(), sk.coef_) < 1e-5
    assert rel(fc.bias.detach(), sk.intercept_) < 1e-5


def test_refit_batch_size_does_not_change_result():
    h, y = make_data(n=301)
    sk = Ridge(alpha=0.1, solver="svd").fit(h.numpy(), onehot(y, 4))
    weights = []
    for bs in (1, 7, 64, 301):
        fc = nn.Linear(12, 4).double()
        pinv_refit_dense(fc, batches(h, y, bs), ridge=0.1, evaluate=False)
        assert rel(fc.weight.detach(), sk.coef_) < 1e-5
        weights.append(fc.weight.detach())
    for w in weights[1:]:
        assert torch.allclose(w, weights[0], rtol=0, atol=1e-10)


def test_refit_float32_layer_and_raw_targets_without_bias():
    h, _ = make_data()
    g = torch.Generator().manual_seed(1)
    t = h @ torch.randn(12, 3, generator=g, dtype=torch.float64)
    fc = nn.Linear(12, 3, bias=False)  # float32 layer, float64 features
    res = pinv_refit_dense(fc, batches(h, t, 50), ridge=0.5, targets="raw")
    sk = Ridge(alpha=0.5, fit_intercept=False, solver="svd").fit(h.numpy(), t.numpy())
    assert fc.weight.dtype == torch.float32
    assert rel(fc.weight.detach(), sk.coef_) < 1e-6
    assert res.bias is None
    assert res.accuracy is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refit_half_precision_features_within_documented_tolerance(dtype):
    h, y = make_data(n=800, d=16, dtype=dtype)
    fc = nn.Linear(16, 4)
    res = pinv_refit_dense(fc, batches(h, y, 128), ridge=1e-2)
    assert torch.isfinite(res.weight).all()
    assert torch.isfinite(res.bias).all()
    # reference on the same (rounded) features in float64; documented: 1e-3 relative
    sk = Ridge(alpha=1e-2, solver="svd").fit(h.double().numpy(), onehot(y, 4))
    assert rel(fc.weight.detach(), sk.coef_) < 1e-3
    assert rel(fc.bias.detach(), sk.intercept_) < 1e-3


def test_refit_logit_inverse_activation_matches_ridge_on_logit_targets():
    h, y = make_data()
    fc = nn.Linear(12, 4).double()
    pinv_refit_dense(fc, batches(h, y, 128), ridge=1.0, inverse_activation="logit")
    t = np.clip(onehot(y, 4), 1e-3, 1 - 1e-3)
    sk = Ridge(alpha=1.0, solver="svd").fit(h.numpy(), np.log(t / (1 - t)))
    assert rel(fc.weight.detach(), sk.coef_) < 1e-5


def test_refit_start_current_and_step_size_follow_the_update_rule():
    h, y = make_data()
    t = onehot(y, 4)
    fc = nn.Linear(12, 4).double()
    w0, b0 = fc.weight.detach().numpy().copy(), fc.bias.detach().numpy().copy()
    # start="current": ridge on the residual, W = W0 + delta, penalty on ||W - W0||
    pinv_refit_dense(fc, batches(h, y, 100), ridge=2.0, start="current", step_size=0.5)
    resid = t - (h.numpy() @ w0.T + b0)
    sk = Ridge(alpha=2.0, solver="svd").fit(h.numpy(), resid)
    assert rel(fc.weight.detach(), w0 + 0.5 * sk.coef_) < 1e-5
    assert rel(fc.bias.detach(), b0 + 0.5 * sk.intercept_) < 1e-5
    # start="zero", step 0.5: halfway from the current weights to the ridge solution
    w1, b1 = fc.weight.detach().numpy().copy(), fc.bias.detach().numpy().copy()
    pinv_refit_dense(fc, batches(h, y, 100), ridge=2.0, step_size=0.5)
    sk = Ridge(alpha=2.0, solver="svd").fit(h.numpy(), t)
    assert rel(fc.weight.detach(), w1 + 0.5 * (sk.coef_ - w1)) < 1e-5
    assert rel(fc.bias.detach(), b1 + 0.5 * (sk.intercept_ - b1)) < 1e-5


# ---------------------------------------------------------------------------------------------
# degenerate problems


def test_refit_rank_deficient_and_wide_give_minimum_norm_solution(caplog):
    caplog.set_level(logging.INFO, logger="torch_recal")
    g = torch.Generator().manual_seed(3)
    base = torch.randn(200, 5, generator=g, dtype=torch.float64)
    h = torch.cat([base, base[:, :3] * 2.0, base[:, :2] - base[:, 2:4]], 1)  # rank 5 of 10
    y = torch.randint(0, 3, (200,), generator=g)
    wide = torch.randn(30, 50, generator=g, dtype=torch.float64)  # d > N
    y_wide = torch.randint(0, 3, (30,), generator=g)
    for feats, labels in ((h, y), (wide, y_wide)):
        fc = nn.Linear(feats.shape[1], 3).double()
        caplog.clear()
        res = pinv_refit_dense(fc, batches(feats, labels, 16), ridge=0.0)
        assert res.solver == "eigh"
        assert [r.levelno for r in caplog.records] == [logging.WARNING]  # the fallback, logged
        assert torch.isfinite(fc.weight).all()
        hc = feats.numpy() - feats.numpy().mean(0)
        t = onehot(labels, 3)
        ref = np.linalg.lstsq(hc, t - t.mean(0), rcond=None)[0]  # minimum-norm
        assert rel(fc.weight.detach(), ref.T) < 1e-6
        assert rel(fc.bias.detach(), t.mean(0) - feats.numpy().mean(0) @ ref) < 1e-6


def test_refit_single_sample_and_single_class():
    fc = nn.Linear(6, 3).double()
    h = torch.randn(1, 6, dtype=torch.float64)
    res = pinv_refit_dense(fc, [(h, torch.tensor([2]))], ridge=1e-3)
    # one sample: centred data are zero, so W = 0 and b = t (sklearn agrees)
    assert torch.equal(res.weight, torch.zeros(3, 6, dtype=torch.float64))
    assert torch.allclose(res.bias, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    assert res.mse == pytest.approx(0.0, abs=1e-12)
    assert res.accuracy == 1.0
    h, _ = make_data(n=50, d=6)
    res = pinv_refit_dense(fc, batches(h, torch.zeros(50, dtype=torch.long), 8), ridge=1e-3)
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
    res = pinv_refit_dense(fc, batches(x, y, 32), model=model, ridge=0.1)
    sk = Ridge(alpha=0.1, solver="svd").fit(feats.numpy(), onehot(y, 10))
    assert rel(fc.weight.detach(), sk.coef_) < 1e-5
    assert res.num_samples == 90
    assert model.training  # mode restored
    assert not fc._forward_pre_hooks
    assert not fc._forward_hooks
    # an error midway (labels out of range in the second batch): hook gone, weights untouched
    before = _params(fc)
    y_bad = y.clone()
    y_bad[40] = 10
    with pytest.raises(ValueError, match="labels of a `loader` batch must lie in"):
        pinv_refit_dense(fc, batches(x, y_bad, 32), model=model)
    assert not fc._forward_pre_hooks
    assert _unchanged(fc, before)
    assert model.training


def test_refit_stack_of_dense_layers_matches_layerwise_references():
    g = torch.Generator().manual_seed(5)
    h = torch.randn(400, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (400,), generator=g)
    stack = nn.Sequential(nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    w1, b1 = stack[2].weight.detach().numpy().copy(), stack[2].bias.detach().numpy().copy()
    res = pinv_refit_dense(stack, batches(h, y, 64), ridge=0.5)
    t = onehot(y, 3)
    # layer 0: target pulled back through the ridge pseudo-inverse of layer 1, then atanh
    a = (t - b1) @ w1 @ np.linalg.inv(w1.T @ w1 + (0.5 + 1e-12) * np.eye(6))
    a0 = np.arctanh(np.clip(a, -1 + 1e-3, 1 - 1e-3))
    sk0 = Ridge(alpha=0.5, solver="svd").fit(h.numpy(), a0)
    assert rel(stack[0].weight.detach(), sk0.coef_) < 1e-5
    # layer 1: plain ridge on the features of the refitted layer 0
    hid = np.tanh(h.numpy() @ sk0.coef_.T + sk0.intercept_)
    sk1 = Ridge(alpha=0.5, solver="svd").fit(hid, t)
    assert rel(stack[2].weight.detach(), sk1.coef_) < 1e-5
    assert len(res.layers) == 2
    assert torch.equal(res.weight, stack[2].weight)


# ---------------------------------------------------------------------------------------------
# batches of any shape, iterables that do not repeat (bad arguments: tests/test_bad_calls.py)


def test_refit_batch_fn_on_dict_batches_equals_the_pair_loader():
    h, y = make_data(n=200)
    pairs = batches(h, y, 64)
    dicts = [{"features": a, "labels": b, "index": i} for i, (a, b) in enumerate(pairs)]
    torch.manual_seed(0)
    fc_pairs = nn.Linear(12, 4).double()
    fc_dicts = copy.deepcopy(fc_pairs)
    ref = pinv_refit_dense(fc_pairs, pairs, ridge=0.1)
    res = pinv_refit_dense(
        fc_dicts, dicts, ridge=0.1, batch_fn=lambda b: (b["features"], b["labels"])
    )
    assert torch.equal(res.weight, ref.weight) and torch.equal(res.bias, ref.bias)
    assert (res.num_samples, res.accuracy, res.mse) == (ref.num_samples, ref.accuracy, ref.mse)
    sk = Ridge(alpha=0.1, solver="svd").fit(h.numpy(), onehot(y, 4))
    assert rel(fc_dicts.weight.detach(), sk.coef_) < 1e-6


class _KeywordNet(nn.Module):
    """A model called with keyword inputs, as Hugging Face models are."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(6, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.body(pixel_values)))


def test_refit_model_with_keyword_inputs_from_batch_fn():
    torch.manual_seed(0)
    model = _KeywordNet().double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(120, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (120,), generator=g)
    dicts = [{"pixel_values": a, "labels": b} for a, b in batches(x, y, 50)]
    copy_model = copy.deepcopy(model)
    res = pinv_refit_dense(
        model.fc, dicts, model=model, ridge=0.5,
        batch_fn=lambda b: ({"pixel_values": b["pixel_values"]}, b["labels"]),
    )  # fmt: skip
    ref = pinv_refit_dense(copy_model.fc, batches(x, y, 50), model=copy_model, ridge=0.5)
    assert torch.equal(res.weight, ref.weight) and torch.equal(res.bias, ref.bias)
    with torch.no_grad():
        feats = torch.tanh(copy_model.body(x)).numpy()
    sk = Ridge(alpha=0.5, solver="svd").fit(feats, onehot(y, 3))
    assert rel(model.fc.weight.detach(), sk.coef_) < 1e-6


def test_refit_iterable_empty_on_its_second_pass_raises_instead_of_accuracy_zero():
    h, y = make_data(n=100)
    fc = nn.Linear(12, 4).double()
    before = _params(fc)
    with pytest.raises(ValueError, match="second pass"):
        pinv_refit_dense(fc, OnePass(batches(h, y, 32)))
    assert _unchanged(fc, before)
    stack = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    before = _params(stack)
    with pytest.raises(ValueError, match="pass 2"):
        pinv_refit_dense(stack, OnePass(batches(h, y, 32)), evaluate=False)
    assert _unchanged(stack, before)
    res = pinv_refit_dense(fc, OnePass(batches(h, y, 32)), evaluate=False)
    sk = Ridge(alpha=1e-3, solver="svd").fit(h.numpy(), onehot(y, 4))
    assert res.accuracy is None and rel(fc.weight.detach(), sk.coef_) < 1e-6


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
    h, y = make_data(n=300, offset=10.0)
    out = run_distributed(_dist_worker, h, y)
    sk = Ridge(alpha=1e-2, solver="svd").fit(h.numpy(), onehot(y, 4))
    for r in out:
        assert r["n"] == 300
        assert r["acc_count"] == 300
        assert rel(r["weight"], sk.coef_) < 1e-8
        assert rel(r["bias"], sk.intercept_) < 1e-8
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
    h, y = make_data(n=230, d=6)
    out = run_distributed(_fsdp_refit_worker, h, y)
    feats = out[0]["features"].numpy()
    sk = Ridge(alpha=1e-2, solver="svd").fit(feats, onehot(y, 4))
    for r in out:
        assert r["is_dtensor"] and r["n"] == 230
        assert rel(r["weight"], sk.coef_) < 1e-8  # the shards hold the refit, not stale values
        assert rel(r["bias"], sk.intercept_) < 1e-8
        assert rel(r["result_weight"], sk.coef_) < 1e-8
        assert rel(r["logits"], feats @ sk.coef_.T + sk.intercept_) < 1e-8  # and it is used


def _dist_failure_worker(rank, world_size, h, y):

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
    h, y = make_data(n=300)
    out = run_distributed(_dist_failure_worker, h, y, timeout_s=30.0)
    assert out[1]["raised"][0] == "ValueError" and "inf or nan" in out[1]["raised"][1]
    assert out[0]["raised"][0] == "RuntimeError"
    assert "failed on another rank" in out[0]["raised"][1]
    assert "rank 1: ValueError" in out[0]["raised"][1] and "inf or nan" in out[0]["raised"][1]
    assert all(r["untouched"] for r in out)
    assert all(r["seconds"] < 25.0 for r in out)  # nobody waited for the collective timeout
