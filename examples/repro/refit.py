"""Fast retraining in its regime: a dense network on the full Fashion-MNIST training set.

An MLP 784-1024-1024-10 (ReLU) trained by SGD (momentum, cosine lr per step to 0) on 50,000
training images, with a validation split of 10,000 drawn per seed from the 60,000 training
images; the explore stage reports on that validation split, the confirm stage on the 10,000
test images (the same train/validation draw per seed). Paired seeds: a seed fixes the split,
the initialisation and the batches of every arm.

``final`` study (all seeds), heads on the penultimate features (1024 wide) of the same
converged SGD network:

* ``sgd``: its own head (the strong baseline);
* ``sgd+refit``: the head replaced by the exact ridge solution of ``pinv_refit_dense`` on the
  features of the training images, the ridge chosen on the validation split from a grid;
* ``sgd+refit-if-better``: the refit kept only when it beats the SGD head on the validation
  split (what a careful user does);
* ``lbfgs-probe``: what a user would pick instead to re-fit a head on fixed features, a
  linear probe by L-BFGS logistic regression (scikit-learn
  ``LogisticRegression(solver="lbfgs")``), ``C`` chosen on the validation split from a grid;
* ``sgd+refit2``: both dense layers after the first refitted, ``pinv_refit_dense`` on the
  stack ``Linear-ReLU-Linear`` (the library's INFERRED pull-back of the targets through the
  last layer), the ridge chosen on the validation split.

``time`` study (the first seeds): per-epoch MP refinement against plain SGD, trained in the
same process with their epochs interleaved (plain epoch, pipeline epoch, ...) and timed as
CPU time (``time.process_time``, one thread; evaluation is not timed):

* ``plain``: the SGD run of ``final/sgd`` (it is that run);
* ``pipeline``: the same SGD, and after every epoch the MP refinement of the head on the
  features of the whole training set, ``start="current", step_size=0.5``; its feature passes,
  solves and validation scoring count in its time.

What is verified and what is not (SPEC, "Fast retraining"): the order per epoch (an SGD
epoch, then the features of the whole training set, then the MP update with the MP learning
rate 0.5) is VERIFIED from the authors' readable scripts; the update itself, a half step
towards the ridge solution on the residual of the current head, is INFERRED (their solver is
obfuscated); the ridge chosen on the validation split each epoch and the bias moving with the
weights (the authors leave it) are ours. So this is the paper's schedule with an inferred
update, not their verified pipeline. Their random layer training samples *conv* layers; this
network has none, so it is left out (both hidden layers are trained every epoch).

The headline time is the CPU time until the accuracy after an epoch first reaches a fixed
target (:data:`TARGET`, declared in advance), as a ratio pipeline / plain. The paper's time
claim (15-25 % less training time) is against the authors' earlier recomputation method;
the comparison with plain SGD at a fixed target is ours.
"""

from __future__ import annotations

import logging
import time
import warnings
from typing import Any, cast

import torch
from torch import nn
from torch.nn import functional as F

from repro.common import Context, Task, check, mean, seed_torch
from repro.train import (
    accuracy,
    cosine,
    eval_key,
    fashion_subsets,
    generator,
    set_lr,
    sgd,
    steps_per_epoch,
    train_epoch,
)
from torch_recal import NormalEquations, pinv_refit_dense

CARD = "refit.md"
HEADLINE = (
    ("final", "refit - SGD"),
    ("final", "refit - L-BFGS probe"),
    ("time", "pipeline / plain: CPU time to target"),
)  # (study, pair label): the Holm family of the confirm run
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
PROBE_C = (1e-3, 1e-2, 1e-1, 1.0)
PROBE_MAX_ITER = 500
TARGET = 0.89  # accuracy the time study's arms race to (chosen in exploration, see how_chosen)
QUICK_TARGET = 0.6
TIMED_SEEDS_CONFIRM = 5  # the time study runs on the first seeds (in the hashed settings)
BATCH = 1024  # rows per update of the normal equations and per feature pass


def protocol(quick: bool, seeds: list[int] | None) -> dict[str, Any]:
    # Exploration: one seed by default (seed 0, timed). ``timed_seeds`` is a rule, "the first
    # up to N seeds are timed": 3 in exploration (the hash of the finished seed-0 part; with
    # one seed, that seed is the one timed), 5 in confirmation.
    seeds = seeds if seeds is not None else list(range(2 if quick else 1))
    ek = eval_key()
    timed = 2 if quick else (TIMED_SEEDS_CONFIRM if ek == "test_acc" else 3)
    split = "the validation split" if ek == "val_acc" else "the test images"
    acc_name = "validation accuracy" if ek == "val_acc" else "test accuracy"
    acc_columns = [[ek, acc_name, "accuracy"]]
    if ek != "val_acc":
        acc_columns.append(["val_acc", "validation accuracy", "accuracy"])
    settings = {
        "data": "Fashion-MNIST: per seed, disjoint train and validation sets drawn from the "
        "60,000 training images; the confirm stage reports on the 10,000 test images",
        "n_train": 2_000 if quick else 50_000,
        "n_val": 1_000 if quick else 10_000,
        "n_test": 1_000 if quick else 10_000,
        "model": "MLP 784-1024-1024-10, ReLU, PyTorch's default init (seeded)",
        "width": 1024,
        "epochs": 2 if quick else 20,
        "batch_size": 128,
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "lr_schedule": "cosine per step from lr to 0 over all epochs (every arm)",
        "ridge_grid": list(RIDGES),
        "refit": "pinv_refit_dense's solution (targets='onehot', unpenalised bias) for every "
        "ridge of the grid from one NormalEquations pass over the penultimate features of the "
        "training images (eval mode); the ridge with the best validation accuracy is kept",
        "refit2": "pinv_refit_dense(nn.Sequential(fc2, ReLU, fc3), training images, "
        "model=model, ridge=r) for every ridge of the grid; the best on validation is kept",
        "probe": {
            "estimator": "sklearn LogisticRegression(solver='lbfgs', C=C, max_iter=max_iter) "
            "on the same features (unscaled, as the refit sees them)",
            "C_grid": list(PROBE_C),
            "max_iter": PROBE_MAX_ITER,
            "threads": "1 (threadpoolctl)",
        },
        "pipeline": {
            "refinement": "after every SGD epoch (the last included): the refit of the head "
            "with start='current', step_size=0.5 (the paper's MP learning rate) on the "
            "features of the whole training set, the ridge chosen on the validation split "
            "from the grid (ours); the bias moves too (the authors leave it)",
            "random_layer_training": "left out: the paper samples conv layers and this "
            "network has none (the two hidden dense layers are always trained)",
            "timed": "SGD epochs + feature passes + accumulation + solves + validation "
            "scoring; not the per-epoch evaluation of either arm",
        },
        "time_target": QUICK_TARGET if quick else TARGET,
        "timed_seeds": timed,
        "time_to_target": "CPU seconds at the end of the first epoch (for the pipeline: "
        "after its refinement) whose accuracy on the reported split is >= time_target; no "
        "interpolation; missing when never reached",
        "how_chosen": "before this exploration, on the validation split of seed 0 (sizing "
        "runs, 20 epochs): lr 0.1 over 0.05 (final validation accuracy 0.9059 vs 0.9049; both "
        "gained 0.07 points over their last 4 epochs, so 20 epochs); the probe on the unscaled "
        "features over StandardScaler + LogisticRegression (best validation 0.9056 vs 0.9047, "
        "the scaled one at the end of its C grid and twice the CPU time), C grid 1e-3..1 (best "
        "1e-2 inside it); the ridge grid 1e-3..1e3 (refit best at 1e-2, flat up to 1); "
        "time_target 0.89, 1.6 points below the plain run's final validation accuracy there "
        "(0.906; plain SGD first reached it at epoch 11 of 20), more than 1 point below so "
        "that a test split slightly harder than the validation split still reaches it",
    }
    if ek == "test_acc" and not quick:  # confirm: the target as the exploration left it
        settings["how_chosen"] += (
            "; kept after the exploration (1 seed, seed 0, validation split, "
            "docs/results/explore/refit.json): plain SGD first reached 0.89 at epoch 11 "
            "(85.7 CPU s, final 0.9059), the pipeline at epoch 10 (118.1 CPU s, final 0.9004), "
            "so both arms cross it more than 1 point below their final accuracy"
        )
    pair = {"a": "final/sgd", "metric": ek, "unit": "accuracy"}
    return {
        "settings": settings,
        "studies": {
            "final": {
                "title": "heads on the features of the same converged SGD network",
                "seeds": list(seeds),
                "arms": [
                    "final/sgd",
                    "final/sgd+refit",
                    "final/sgd+refit-if-better",
                    "final/lbfgs-probe",
                    "final/sgd+refit2",
                ],
                "labels": {
                    "final/sgd": "SGD, cosine lr to 0 (its own head)",
                    "final/sgd+refit": "+ refit of the head (ridge chosen on val)",
                    "final/sgd+refit-if-better": "+ refit, kept only if better on val",
                    "final/lbfgs-probe": "L-BFGS logistic-regression probe (C chosen on val)",
                    "final/sgd+refit2": "+ refit of both dense layers after the first",
                },
                "columns": [
                    *acc_columns,
                    ["fit_cpu_seconds", "head fitting CPU s (grid included)", "s"],
                ],
                "pairs": [
                    {"label": "refit - SGD", **pair, "b": "final/sgd+refit", "expected": "+"},
                    {
                        "label": "refit if better - SGD",
                        **pair,
                        "b": "final/sgd+refit-if-better",
                        "expected": "+",
                    },
                    {
                        "label": "refit - L-BFGS probe",
                        **pair,
                        "a": "final/lbfgs-probe",
                        "b": "final/sgd+refit",
                        "expected": "+",
                    },
                    {
                        "label": "L-BFGS probe - SGD",
                        **pair,
                        "b": "final/lbfgs-probe",
                        "expected": "",
                    },
                    {
                        "label": "refit of 2 layers - SGD",
                        **pair,
                        "b": "final/sgd+refit2",
                        "expected": "",
                    },
                    {
                        "label": "refit / L-BFGS probe: fitting CPU time",
                        "a": "final/lbfgs-probe",
                        "b": "final/sgd+refit",
                        "metric": "fit_cpu_seconds",
                        "unit": "x",
                        "scale": "log_ratio",
                        "expected": "-",
                    },
                ],
            },
            "time": {
                "title": "SGD + per-epoch MP refinement of the head vs plain SGD, CPU time",
                "seeds": list(seeds[:timed]),
                "arms": ["time/plain", "time/pipeline"],
                "labels": {
                    "time/plain": "plain SGD",
                    "time/pipeline": "SGD + MP refinement after every epoch",
                },
                "columns": [
                    [ek, f"final {acc_name}", "accuracy"],
                    ["cpu_seconds", "training CPU s", "s"],
                    ["time_to_target", f"CPU s to target on {split}", "s"],
                    ["epochs_to_target", "epochs to target", ""],
                ],
                "pairs": [
                    {
                        "label": "pipeline / plain: CPU time to target",
                        "a": "time/plain",
                        "b": "time/pipeline",
                        "metric": "time_to_target",
                        "unit": "x",
                        "scale": "log_ratio",
                        "expected": "-",
                    },
                    {
                        "label": "pipeline - plain: final accuracy",
                        "a": "time/plain",
                        "b": "time/pipeline",
                        "metric": ek,
                        "unit": "accuracy",
                        "expected": "+",
                    },
                    {
                        "label": "pipeline / plain: training CPU time",
                        "a": "time/plain",
                        "b": "time/pipeline",
                        "metric": "cpu_seconds",
                        "unit": "x",
                        "scale": "log_ratio",
                        "expected": "",
                    },
                ],
            },
        },
    }


def tasks(proto: dict[str, Any]) -> list[Task]:
    timed = set(proto["studies"]["time"]["seeds"])
    return [
        Task(f"seed{s}-{'timed' if s in timed else 'final'}", s, "run", {"timed": s in timed})
        for s in proto["studies"]["final"]["seeds"]
    ]


# --------------------------------------------------------------------------- model, heads
def mlp(width: int = 1024) -> nn.Sequential:
    """``784-width-width-10`` with ReLU: ``model[3]`` is the stack ``fc2, ReLU, fc3`` and
    ``model[3][2]`` the head."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, width),
        nn.ReLU(),
        nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)),
    )


def top(model: nn.Sequential) -> nn.Sequential:
    """The stack ``fc2, ReLU, fc3`` after the first hidden layer."""
    return cast(nn.Sequential, model[3])


def head(model: nn.Sequential) -> nn.Linear:
    return cast(nn.Linear, top(model)[2])


@torch.no_grad()
def features(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The head's input (penultimate features) in eval mode; the mode is restored."""
    was = model.training
    model.eval()
    out = torch.cat([top(model)[:2](model[:3](x[i : i + BATCH])) for i in range(0, len(x), BATCH)])
    model.train(was)
    return out


def head_accuracy(
    weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor, y: torch.Tensor
) -> float:
    """Accuracy of the linear head ``(weight, bias)`` cast to the features' dtype, as the
    layer would hold it."""
    w, b = weight.to(h.dtype), bias.to(h.dtype)
    return float(((h @ w.T + b).argmax(1) == y).double().mean())


def refit_grid(
    fc: nn.Linear,
    h: torch.Tensor,
    y: torch.Tensor,
    hv: torch.Tensor,
    vy: torch.Tensor,
    ridges: tuple[float, ...] = RIDGES,
    *,
    start: str = "zero",
    step_size: float = 1.0,
    assign: bool = True,
) -> dict[str, Any]:
    """``pinv_refit_dense(fc, [(h, y)], ridge=r, start=start, step_size=step_size)`` for every
    ridge ``r`` of the grid from one accumulation of the normal equations; the ridge with the
    best validation accuracy on ``(hv, vy)`` is kept (the first of equals).

    Returns ``{"ridge", "val_acc", "val_by_ridge", "weight", "bias", "rel_change",
    "eigh_fallbacks"}`` (the chosen weights in ``fc``'s dtype; ``rel_change``:
    ``||W_new - W|| / ||W||``; ``eigh_fallbacks``: solves of the grid that fell back from
    Cholesky to the eigendecomposition); with ``assign`` they are written into ``fc``.
    """
    k = fc.out_features
    eqs = NormalEquations(h.shape[1], k)
    for i in range(0, len(y), BATCH):
        eqs.update(h[i : i + BATCH], F.one_hot(y[i : i + BATCH], k).to(h.dtype))
    w0, b0 = fc.weight.detach().double(), fc.bias.detach().double()
    best: tuple[float, float, torch.Tensor, torch.Tensor] | None = None
    scores: dict[str, float] = {}
    fallbacks = 0
    for ridge in ridges:
        current = start == "current"
        sol = eqs.solve(ridge, start=w0 if current else None, start_bias=b0 if current else None)
        assert sol.bias is not None
        fallbacks += sol.solver != "cholesky"
        w, b = sol.weight, sol.bias
        if step_size != 1:
            w, b = w0 + step_size * (w - w0), b0 + step_size * (b - b0)
        w, b = w.to(fc.weight.dtype), b.to(fc.bias.dtype)
        acc = head_accuracy(w, b, hv, vy)
        scores[f"{ridge:g}"] = acc
        if best is None or acc > best[0]:
            best = (acc, ridge, w, b)
    assert best is not None
    acc, ridge, w, b = best
    change = float((w.double() - w0).norm() / w0.norm().clamp_min(1e-30))
    if assign:
        with torch.no_grad():
            fc.weight.copy_(w)
            fc.bias.copy_(b)
    return {"ridge": ridge, "val_acc": acc, "val_by_ridge": scores, "weight": w, "bias": b,
            "rel_change": change, "eigh_fallbacks": fallbacks}  # fmt: skip


def lbfgs_probe(
    h: torch.Tensor,
    y: torch.Tensor,
    hv: torch.Tensor,
    vy: torch.Tensor,
    cs: tuple[float, ...] = PROBE_C,
    max_iter: int = PROBE_MAX_ITER,
) -> tuple[Any, dict[str, Any]]:
    """The linear probe a user would fit instead: scikit-learn's
    ``LogisticRegression(solver="lbfgs", C=C, max_iter=max_iter)`` on the features, for every
    ``C`` of the grid; the best on validation is kept (the first of equals).

    Returns the fitted estimator and ``{"C", "val_acc", "val_by_C", "iters_by_C", "n_iter",
    "converged"}`` (``converged``: the chosen fit stopped before ``max_iter``).
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    hn, yn, hvn, vyn = h.numpy(), y.numpy(), hv.numpy(), vy.numpy()
    best: tuple[float, float, Any] | None = None
    scores: dict[str, float] = {}
    iters: dict[str, int] = {}
    for c in cs:
        est = LogisticRegression(solver="lbfgs", C=c, max_iter=max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            est.fit(hn, yn)
        acc = float((est.predict(hvn) == vyn).mean())
        scores[f"{c:g}"] = acc
        iters[f"{c:g}"] = int(est.n_iter_.max())
        if best is None or acc > best[0]:
            best = (acc, c, est)
    assert best is not None
    n_iter = iters[f"{best[1]:g}"]
    return best[2], {"C": best[1], "val_acc": best[0], "val_by_C": scores, "iters_by_C": iters,
                     "n_iter": n_iter, "converged": n_iter < max_iter}  # fmt: skip


def first_reach(curve: list[dict[str, float]], target: float) -> tuple[float | None, int | None]:
    """``(cpu, epoch)`` of the first point of the curve whose accuracy is >= target (the CPU
    seconds measured at that epoch's end, no interpolation), or ``(None, None)``."""
    for p in curve:
        if p["acc"] >= target:
            return p["cpu"], int(p["epoch"])
    return None, None


# --------------------------------------------------------------------------- the task
def data(ctx: Context) -> tuple[torch.Tensor, ...]:
    s = ctx.proto["settings"]
    return fashion_subsets(ctx.data_dir, ctx.seed, s["n_train"], s["n_val"], s["n_test"])


class Arm:
    """A model, its optimizer, its per-step cosine lr, its CPU time and its accuracy curve."""

    def __init__(self, ctx: Context, n: int) -> None:
        s = ctx.proto["settings"]
        seed_torch(ctx.seed, 0)  # the same initialisation for both arms
        self.model = mlp(s["width"])
        self.opt = sgd(
            self.model.parameters(), s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"]
        )
        self.per_epoch = steps_per_epoch(n, s["batch_size"])
        self.total = s["epochs"] * self.per_epoch
        self.s, self.seed = s, ctx.seed
        self.cpu = 0.0
        self.epoch_cpu: list[float] = []
        self.curve: list[dict[str, float]] = []

    def epoch(self, e: int, x: torch.Tensor, y: torch.Tensor) -> None:
        s = self.s
        st = train_epoch(
            self.model,
            self.opt,
            x,
            y,
            batch_size=s["batch_size"],
            gen=generator(self.seed, 3, e),
            before_step=lambda i: set_lr(
                self.opt, cosine(s["lr"], e * self.per_epoch + i, self.total)
            ),
        )
        self.cpu += st.cpu_seconds
        self.epoch_cpu.append(st.cpu_seconds)

    def point(self, e: int, x: torch.Tensor, y: torch.Tensor) -> None:
        self.curve.append({"epoch": e, "cpu": self.cpu, "acc": accuracy(self.model, x, y)})


def run(ctx: Context) -> dict[str, Any]:
    import sklearn.linear_model  # noqa: F401  (loads scipy's BLAS before it is limited)
    from threadpoolctl import threadpool_limits

    log = logging.getLogger("torch_recal")
    level = log.level
    log.setLevel(logging.ERROR)  # solver fallbacks are counted in the result instead
    try:
        with threadpool_limits(1):  # numpy/scikit-learn BLAS on one thread, as torch
            return _run(ctx)
    finally:
        log.setLevel(level)


def _run(ctx: Context) -> dict[str, Any]:
    s = ctx.proto["settings"]
    ek = eval_key()
    x, y, vx, vy, ex, ey = data(ctx)
    plain = Arm(ctx, len(y))
    pipe = Arm(ctx, len(y)) if ctx.args["timed"] else None
    plain_val, refines = [], []
    if pipe is not None:
        plain.point(0, ex, ey)
        pipe.point(0, ex, ey)
    for e in range(s["epochs"]):
        plain.epoch(e, x, y)
        plain_val.append(accuracy(plain.model, vx, vy))
        if pipe is None:
            continue
        plain.point(e + 1, ex, ey)
        pipe.epoch(e, x, y)
        t0 = time.process_time()  # the refinement counts in the pipeline's time
        h, hv = features(pipe.model, x), features(pipe.model, vx)
        before = head_accuracy(head(pipe.model).weight, head(pipe.model).bias, hv, vy)
        r = refit_grid(head(pipe.model), h, y, hv, vy, start="current", step_size=0.5)
        pipe.cpu += time.process_time() - t0
        refines.append({"ridge": r["ridge"], "val_before": before, "val_after": r["val_acc"],
                        "rel_change": r["rel_change"], "eigh_fallbacks": r["eigh_fallbacks"],
                        "cpu": time.process_time() - t0})  # fmt: skip
        pipe.point(e + 1, ex, ey)

    model = plain.model
    fc = head(model)
    sgd_eval, sgd_val = accuracy(model, ex, ey), plain_val[-1]
    t0 = time.process_time()
    h, hv = features(model, x), features(model, vx)
    he = hv if ek == "val_acc" else features(model, ex)
    feat_cpu = time.process_time() - t0
    t0 = time.process_time()
    chosen = refit_grid(fc, h, y, hv, vy, assign=False)
    refit_cpu = time.process_time() - t0
    refit_eval = head_accuracy(chosen["weight"], chosen["bias"], he, ey)
    keep = chosen["val_acc"] > sgd_val
    t0 = time.process_time()
    probe, pinfo = lbfgs_probe(h, y, hv, vy)
    probe_cpu = time.process_time() - t0
    probe_eval = float((probe.predict(he.numpy()) == ey.numpy()).mean())
    two = refit_stack(model, x, y, vx, vy)
    two_eval = accuracy(two.pop("model"), ex, ey)
    arms: dict[str, Any] = {
        "final/sgd": {
            "val_acc": sgd_val,
            ek: sgd_eval,
            "val_curve": plain_val,
            "train_acc": accuracy(model, x, y),
            "train_cpu_seconds": plain.cpu,
            "epoch_cpu_seconds": mean(plain.epoch_cpu),
            "features_cpu_seconds": feat_cpu,
        },
        "final/sgd+refit": {
            "val_acc": chosen["val_acc"],
            ek: refit_eval,
            "ridge": chosen["ridge"],
            "val_by_ridge": chosen["val_by_ridge"],
            "eigh_fallbacks": chosen["eigh_fallbacks"],
            "train_acc": head_accuracy(chosen["weight"], chosen["bias"], h, y),
            "fit_cpu_seconds": refit_cpu,
        },
        "final/sgd+refit-if-better": {
            "val_acc": max(chosen["val_acc"], sgd_val),
            ek: refit_eval if keep else sgd_eval,
            "kept": keep,
        },
        "final/lbfgs-probe": {
            "val_acc": pinfo["val_acc"],
            ek: probe_eval,
            "C": pinfo["C"],
            "val_by_C": pinfo["val_by_C"],
            "iters_by_C": pinfo["iters_by_C"],
            "converged": pinfo["converged"],
            "train_acc": float((probe.predict(h.numpy()) == y.numpy()).mean()),
            "fit_cpu_seconds": probe_cpu,
        },
        "final/sgd+refit2": {ek: two_eval, **two},
    }
    if pipe is not None:
        target = s["time_target"]
        for name, arm in (("time/plain", plain), ("time/pipeline", pipe)):
            cpu, epochs = first_reach(arm.curve, target)
            arms[name] = {
                "val_acc": sgd_val if arm is plain else accuracy(pipe.model, vx, vy),
                ek: arm.curve[-1]["acc"],
                "cpu_seconds": arm.cpu,
                "time_to_target": cpu,
                "epochs_to_target": epochs,
                "target": target,
                "curve": arm.curve,
            }
        arms["time/pipeline"]["refinements"] = refines
        arms["time/pipeline"]["refine_cpu_seconds"] = sum(r["cpu"] for r in refines)
    return {"arms": arms}


def refit_stack(
    model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, vx: torch.Tensor, vy: torch.Tensor
) -> dict[str, Any]:
    """``pinv_refit_dense`` on ``model[3]`` (fc2, ReLU, fc3) for every ridge of the grid on a
    copy of ``model``; the best on validation is kept. Returns the metrics and the model."""
    import copy

    loader = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(y), BATCH)]
    t0 = time.process_time()
    best: tuple[float, float, nn.Sequential] | None = None
    scores = {}
    fallbacks = 0
    for ridge in RIDGES:
        m = copy.deepcopy(model)
        res = pinv_refit_dense(top(m), loader, model=m, ridge=ridge, evaluate=False)
        fallbacks += sum(r.solver != "cholesky" for r in res.layers)
        acc = accuracy(m, vx, vy)
        scores[f"{ridge:g}"] = acc
        if best is None or acc > best[0]:
            best = (acc, ridge, m)
    assert best is not None
    return {"val_acc": best[0], "ridge": best[1], "val_by_ridge": scores,
            "eigh_fallbacks": fallbacks, "fit_cpu_seconds": time.process_time() - t0,
            "model": best[2]}  # fmt: skip


# --------------------------------------------------------------------------- premise, card
def premise(
    proto: dict[str, Any], seeds: list[dict[str, Any]], infos: dict[str, Any]
) -> list[dict[str, Any]]:
    gains, train, gaps = [], [], []
    for rec in seeds:
        sgd_arm = rec["arms"].get("final/sgd", {})
        curve = sgd_arm.get("val_curve", [])
        if len(curve) >= 2:  # validation accuracy gained over the last two epochs
            gains.append((curve[-1] - curve[-min(3, len(curve))]) * 100)
        if "train_acc" in sgd_arm:
            train.append(sgd_arm["train_acc"])
            gaps.append((sgd_arm["train_acc"] - sgd_arm["val_acc"]) * 100)
    changes, runs = [], []
    for rec in seeds:
        for r in rec["arms"].get("time/pipeline", {}).get("refinements", []):
            changes.append(r["rel_change"])
            runs.append(r["cpu"])
    return [
        check(
            "SGD baseline converged: validation accuracy gained over its last 2 epochs, points "
            "(mean over seeds)",
            mean(gains) if gains else None,
            "<",
            0.5,
            f"largest seed {max(gains):+.2f}" if gains else "",
        ),
        check(
            "features not trivially separable: the SGD network's training accuracy (mean "
            "over seeds); at 1.0 every head fits the training set and a refit has nothing to "
            "correct",
            mean(train),
            "<",
            0.995,
        ),
        check(
            "not underfit: training minus validation accuracy of the SGD network, points "
            "(mean over seeds); the features carry more than the head uses on held-out data",
            mean(gaps),
            ">",
            1.0,
        ),
        check(
            "the MP refinement runs: relative change of the head's weights per refinement, "
            "||W_new - W|| / ||W|| (mean over the timed seeds' epochs)",
            mean(changes),
            ">",
            1e-3,
            f"{len(runs)} refinements, {mean(runs) or 0:.1f} CPU s each on average" if runs else "",
        ),
    ]


def _split_words(proto: dict[str, Any]) -> tuple[str, str]:
    """(what the figures are reported on, its short name), without naming a split that the
    stage does not read."""
    s = proto["settings"]
    if proto.get("stage") == "confirm":
        return f"the {s['n_test']:,} test images", "test"
    return f"the {s['n_val']:,}-image validation split", "validation"


def describe(proto: dict[str, Any]) -> list[str]:
    s = proto["settings"]
    where, _ = _split_words(proto)
    return [
        f"Protocol: MLP 784-{s['width']}-{s['width']}-10 (ReLU) on Fashion-MNIST, "
        f"{s['n_train']:,} training and {s['n_val']:,} validation images drawn per seed from "
        f"the 60,000 training images; figures on {where}. {s['epochs']} epochs of SGD (lr "
        f"{s['lr']}, cosine per step to 0, momentum {s['momentum']}, wd {s['weight_decay']}, "
        f"batch {s['batch_size']}). On the penultimate features of the trained network: the "
        f"refit (`pinv_refit_dense`, ridge chosen on the validation split from "
        f"{s['ridge_grid']}), the refit of both dense layers after the first (the same grid), "
        f'and the L-BFGS probe (scikit-learn `LogisticRegression(solver="lbfgs")` on the same '
        f"unscaled features, C from {s['probe']['C_grid']} chosen on the validation split, "
        f"max_iter {s['probe']['max_iter']}). Time study: the same SGD with the MP refinement "
        f'of the head after every epoch (`start="current", step_size=0.5`; the per-epoch '
        f"order and the MP learning rate 0.5 are VERIFIED from the authors' scripts, the "
        f"update as a half step towards the ridge solution on the residual is INFERRED, the "
        f"ridge chosen on the validation split each epoch and the moving bias are ours; "
        f"random layer training left out: it samples conv layers and there are none), the "
        f"two arms' epochs interleaved in one process and timed as CPU time (evaluation not "
        f"timed); time to target = the CPU time at the end of the first epoch whose accuracy "
        f"reaches {s['time_target']} (fixed in advance).",
        *_explore_seeds_words(proto),
    ]


def _explore_seeds_words(proto: dict[str, Any]) -> list[str]:
    """A sentence on the exploration's seeds (none for the confirm stage)."""
    if proto.get("stage") == "confirm" or proto.get("quick"):
        return []
    seeds = proto["studies"]["final"]["seeds"]
    timed = proto["studies"]["time"]["seeds"]
    if len(seeds) > 1:
        return []
    return [
        f"The exploration had {len(seeds)} seed (seed {seeds[0]}, "
        f"{'timed' if timed else 'not timed'}): about 9 CPU min per timed seed on this shared "
        f"machine, and the other planned seeds were not run. One seed gives no interval and "
        f"decides nothing; it checked the premises and that the time target "
        f"({proto['settings']['time_target']}, set on this seed's validation curves before "
        f"the exploration) is crossed by both arms, which the confirm protocol declares."
    ]


def extra_panels(result: dict[str, Any]) -> list:
    proto = result["protocol"]
    _, short = _split_words(proto)
    target = proto["settings"]["time_target"]

    def draw(ax) -> None:
        for arm, color in (("time/plain", "tab:blue"), ("time/pipeline", "tab:orange")):
            first = True
            for rec in result["seeds"]:
                c = rec["arms"].get(arm, {}).get("curve")
                if not c:
                    continue
                ax.plot(
                    [p["cpu"] for p in c[1:]],
                    [p["acc"] for p in c[1:]],
                    marker="o",
                    markersize=3,
                    color=color,
                    alpha=0.7,
                    label=arm.split("/")[1] if first else None,
                )
                first = False
        ax.axhline(target, color="black", linewidth=0.8, linestyle="--", label="target")
        ax.set_xlabel("training CPU seconds (one thread)")
        ax.set_ylabel(f"{short} accuracy after each epoch")
        ax.set_title("time to accuracy, one line per seed", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    return [draw]


def notes(result: dict[str, Any]) -> list[str]:
    """The choices made on the validation split and where the time goes (from the JSON; a
    sentence is left out when its figures are not in the result)."""
    recs = [rec["arms"] for rec in result["seeds"]]

    def values(arm: str, key: str) -> list[Any]:
        return [a[arm][key] for a in recs if a.get(arm, {}).get(key) is not None]

    def avg(arm: str, key: str) -> float | None:
        return mean(values(arm, key))

    def listed(vals: list[Any]) -> str:
        return ", ".join(f"{v:g}" for v in vals)

    out: list[str] = []
    kept, ridges = values("final/sgd+refit-if-better", "kept"), values("final/sgd+refit", "ridge")
    if kept and ridges:
        out.append(
            f"The refit beat the SGD head on the validation split in {sum(kept)} of "
            f"{len(kept)} seeds (ridges chosen: {listed(ridges)})."
        )
    ridges2 = values("final/sgd+refit2", "ridge")
    if ridges2:
        out.append(f"The refit of two layers chose ridges {listed(ridges2)}.")
    cs, conv = values("final/lbfgs-probe", "C"), values("final/lbfgs-probe", "converged")
    if cs and conv:
        out.append(
            f"The L-BFGS probe chose C = {listed(cs)}; at the chosen C it converged within "
            f"max_iter in {sum(conv)} of {len(conv)} seeds."
        )
    costs = [avg("final/sgd", "epoch_cpu_seconds"), avg("final/sgd", "features_cpu_seconds"),
             avg("final/sgd+refit", "fit_cpu_seconds"), avg("final/lbfgs-probe", "fit_cpu_seconds"),
             avg("final/sgd+refit2", "fit_cpu_seconds")]  # fmt: skip
    if all(c is not None for c in costs):
        e, f, r, p, r2 = (float(c) for c in costs)  # type: ignore[arg-type]
        out += [
            "",
            f"Cost (mean CPU s, one thread): one SGD epoch {e:.1f}; the features of the "
            f"training and validation images {f:.1f}; then the refit with its ridge grid "
            f"{r:.1f}, the L-BFGS probe with its C grid {p:.1f}, the refit of two layers with "
            f"its ridge grid {r2:.1f} (its own feature passes included).",
        ]
    timed = [a for a in recs if "refinements" in a.get("time/pipeline", {})]
    if timed:
        refine = mean([a["time/pipeline"].get("refine_cpu_seconds") for a in timed]) or 0.0
        extra = mean([a["time/pipeline"]["cpu_seconds"] - a["time/plain"]["cpu_seconds"]
                      for a in timed]) or 0.0  # fmt: skip
        steps = [r for a in timed for r in a["time/pipeline"]["refinements"]]
        gain = mean([(r["val_after"] - r["val_before"]) * 100 for r in steps]) or 0.0
        out += [
            "",
            f"Where the pipeline's time goes (mean over the timed seeds): its refinements took "
            f"{refine:.1f} CPU s in all, and it trained {extra:+.1f} CPU s longer than plain "
            f"SGD; a refinement changed the validation accuracy of the current network by "
            f"{gain:+.2f} points on average (before the next epoch).",
        ]
    return out
