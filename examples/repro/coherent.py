"""CoherentStrongReg: a compression budget against gradual magnitude pruning, the gate
against the simple schedule, and the bias of the gate's progress estimate.

Two models on Fashion-MNIST subsets, paired seeds (a seed fixes the data subsets, the
initialisation and the batches of every run):

* ``mlp5``: an MLP with 5 hidden layers of 256 (784-256x5-10, 465k weights);
* ``cnn``: a small CNN (conv 8-16-32, fc 64; 110k weights).

SGD (momentum 0.9, cosine lr per step to 0, batch 128, no weight decay), 15 epochs.

Studies:

* ``<model>-budget`` (the headline): at 5x, 10x and 30x compression (sparsity 0.8, 0.9,
  0.9667 of the conv/linear weights), every run trained to that budget:
  ``CoherentStrongReg(target_sparsity=s)`` with its defaults (and, in exploration, the
  design alternatives) against gradual magnitude pruning (Zhu & Gupta 2017) built on
  ``torch.nn.utils.prune`` with the cubic schedule of ``torch.ao.pruning.CubicSL``
  (per-layer and global), and the dense run. A level is the accuracy of the run trained to
  it, never an interpolation.
* ``<model>-criteria``: the strength-driven criteria over a strength grid: the descent gate
  (next-batch progress, the default gate), the gate with the same-batch progress, and the
  simple schedule (``Always``: warm-up, proximal L1, freeze). Per seed and criterion: among
  its runs with at least 10x (30x) compression, the one with the best validation accuracy,
  and that run's reported accuracy; a seed with no such run is missing (listed).
* ``batch``: MLP5 at batch 32, 128, 512, one strength: the gate (next- and same-batch) and
  the schedule (compression, accuracy, the gate's on-fraction).
* ``bias``: MLP5 trained plainly at batch 32, 128, 512; at ~60 steps spread over the run, the
  optimizer's step ``d = w_t - w_{t+1}`` is scored by the same-batch estimate ``<g_t, d>``,
  the next-batch estimate ``<g_{t+1}, d>`` and the actual decrease of the loss on a fixed
  held-out set of validation images ``L(w_t) - L(w_{t+1})``; the estimates' sums over the run
  divided by the actual decrease's (geometric mean ratios over seeds).
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import nn
from torch.ao.pruning.scheduler.cubic_scheduler import CubicSL
from torch.nn import functional as F
from torch.nn.utils import prune

from repro.common import Context, Task, check, mean, seed_torch
from repro.train import (
    accuracy,
    batches,
    cosine,
    current_stage,
    eval_key,
    fashion_subsets,
    generator,
    set_lr,
    steps_per_epoch,
)
from torch_recal import Always, Budget, CoherentStrongReg, DescentGate, compression_report

CARD = "coherent.md"
LEVELS = {5: 0.8, 10: 0.9, 30: 0.9667}  # compression -> target sparsity of the weights
MODELS = {"mlp5": 10_000, "cnn": 5_000}  # model -> training images
BUDGETS = {  # arm -> (label, how it compresses); explore compares designs, confirm the default
    "gmp": ("gradual magnitude pruning, per layer (torch.nn.utils.prune, cubic)", "layer"),
    "gmp-global": ("gradual magnitude pruning, global (torch.nn.utils.prune, cubic)", "global"),
    "budget": ("CoherentStrongReg(target_sparsity=s) (defaults)", {}),
    "budget-magnitude": ("budget, method='magnitude'", {"method": "magnitude"}),
    "budget-layer": ("budget, allocation='layer'", {"allocation": "layer"}),
}
CONFIRM_BUDGETS = ("gmp", "gmp-global", "budget")
GRID = (3e-3, 6e-3, 1e-2, 3e-2)  # proximal L1 strengths of the criteria study
CRITERIA = {  # arm -> (label, CoherentStrongReg options)
    "gate": ("descent gate, next-batch progress (DescentGate())", {"criterion": DescentGate()}),
    "gate-same": (
        "descent gate, same-batch progress",
        {"criterion": DescentGate(progress="same-batch")},
    ),
    "schedule": ("warm-up, proximal L1, freeze (Always())", {"criterion": Always()}),
}
BATCHES = (32, 128, 512)
BATCH_STRENGTH = 1e-2
CRITERIA_LEVELS = (10, 30)
HEADLINE = tuple(
    (f"{m}-budget", f"budget - GMP at {c}x") for m in MODELS for c in LEVELS
)  # the Holm family of the confirm run (study, pair label)


def _best_gmp(proto: dict[str, Any]) -> str:
    return proto["settings"].get("gmp_reference", "gmp")


def protocol(quick: bool, seeds: list[int] | None) -> dict[str, Any]:
    seeds = seeds if seeds is not None else list(range(1 if quick else 3))
    ek = eval_key()
    confirm = current_stage() == "confirm"
    budgets = [b for b in BUDGETS if not confirm or b in CONFIRM_BUDGETS]
    settings = {
        "data": "Fashion-MNIST: train and validation subsets drawn per seed (disjoint) from the "
        "60,000 training images; the reported accuracy is on the validation split "
        "(exploration) or on a test subset of the 10,000 test images (confirmation)",
        "n_train": {m: (512 if quick else n) for m, n in MODELS.items()},
        "n_val": 512 if quick else 2_000,
        "n_test": 512 if quick else 5_000,
        "epochs": 2 if quick else 15,
        "batch_size": 128,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "lr_schedule": "cosine per step to 0",
        "models": {
            "mlp5": "Flatten, 5 x (Linear(., 256), ReLU), Linear(256, 10)",
            "cnn": "Conv(1,8,3)-ReLU-MaxPool, Conv(8,16,3)-ReLU-MaxPool, Conv(16,32,3)-ReLU, "
            "Linear(1568, 64)-ReLU, Linear(64, 10)",
        },
        "regularised": "conv/linear weights (not biases); sparsity counts their exact zeros",
        "levels": {f"{c}x": s for c, s in LEVELS.items()},
        "budgets": {b: BUDGETS[b][0] for b in budgets},
        "gmp": "torch.nn.utils.prune.l1_unstructured per layer (gmp) or global_unstructured "
        "(gmp-global); sparsity from torch.ao.pruning's CubicSL formula, from step "
        "steps_per_epoch to 0.8 x steps, pruned every max(1, steps_per_epoch // 10) steps; "
        "the masks kept to the end, then made permanent (prune.remove)",
        "gmp_reference": "gmp",
        "criteria": {c: CRITERIA[c][0] for c in CRITERIA},
        "strengths": list(GRID[1::2] if quick else GRID),
        "criteria_levels": list(CRITERIA_LEVELS),
        "batch_sizes": [32, 128] if quick else list(BATCHES),
        "batch_strength": BATCH_STRENGTH,
        "bias_points": 8 if quick else 60,
        "bias_images": 256 if quick else 2_000,
        "how_chosen": "models, data and schedule from the earlier suite; levels 5x/10x/30x "
        "declared before this exploration; every design choice of the budget and the "
        "criteria's defaults is made on the validation split in exploration",
    }
    studies: dict[str, Any] = {}
    acc_col = [ek, ek.replace("_acc", " accuracy"), "accuracy"]
    for model in MODELS:
        arms = [f"{model}-budget/dense"] + [
            f"{model}-budget/{b}-{c}x" for c in LEVELS for b in budgets
        ]
        labels = {f"{model}-budget/dense": "dense (no pruning)"}
        labels.update(
            {
                f"{model}-budget/{b}-{c}x": f"{BUDGETS[b][0]} at {c}x"
                for c in LEVELS
                for b in budgets
            }
        )
        pairs = []
        for c in LEVELS:
            pairs.append(
                _pair(
                    f"budget - GMP at {c}x",
                    f"{model}-budget/gmp-{c}x",
                    f"{model}-budget/budget-{c}x",
                    ek,
                    "+",
                )
            )
            for b in budgets:
                if b not in ("gmp", "budget"):
                    pairs.append(
                        _pair(
                            f"{b} - GMP at {c}x",
                            f"{model}-budget/gmp-{c}x",
                            f"{model}-budget/{b}-{c}x",
                            ek,
                            "+",
                        )
                    )
            pairs.append(
                _pair(
                    f"budget at {c}x - dense",
                    f"{model}-budget/dense",
                    f"{model}-budget/budget-{c}x",
                    ek,
                    "",
                )
            )
            pairs.append(
                _pair(
                    f"GMP at {c}x - dense",
                    f"{model}-budget/dense",
                    f"{model}-budget/gmp-{c}x",
                    ek,
                    "",
                )
            )
        studies[f"{model}-budget"] = {
            "title": f"{model}: trained to a compression budget (5x, 10x, 30x)",
            "seeds": list(seeds),
            "arms": arms,
            "labels": labels,
            "columns": [acc_col, ["sparsity", "sparsity reached", ""]],
            "pairs": pairs,
        }
        carms = [f"{model}-criteria/{c}" for c in CRITERIA]
        cpairs = []
        for lvl in CRITERIA_LEVELS:
            metric = f"acc_at_{lvl}x"
            cpairs += [
                _pair(
                    f"gate - schedule at >= {lvl}x",
                    f"{model}-criteria/schedule",
                    f"{model}-criteria/gate",
                    metric,
                    "+",
                ),
                _pair(
                    f"gate (same-batch) - schedule at >= {lvl}x",
                    f"{model}-criteria/schedule",
                    f"{model}-criteria/gate-same",
                    metric,
                    "+",
                ),
            ]
        studies[f"{model}-criteria"] = {
            "title": f"{model}: strength-driven criteria, best run (on validation) at or above "
            "10x / 30x compression",
            "seeds": list(seeds),
            "arms": carms,
            "labels": {f"{model}-criteria/{c}": CRITERIA[c][0] for c in CRITERIA},
            "columns": [
                [f"acc_at_{lvl}x", f"accuracy at >= {lvl}x", "accuracy"] for lvl in CRITERIA_LEVELS
            ]
            + [["max_compression", "most compression (any accuracy)", "x"]],
            "pairs": cpairs,
        }
    bsizes = settings["batch_sizes"]
    studies["batch"] = {
        "title": f"mlp5: batch size, strength {BATCH_STRENGTH:g}",
        "seeds": list(seeds),
        "arms": [f"batch/{c}-b{b}" for b in bsizes for c in CRITERIA],
        "labels": {
            f"batch/{c}-b{b}": f"{CRITERIA[c][0]}, batch {b}" for b in bsizes for c in CRITERIA
        },
        "columns": [
            acc_col,
            ["compression", "compression", "x"],
            ["on_fraction", "regulariser on (share of steps)", ""],
        ],
        "pairs": [
            _pair(
                f"gate - schedule: compression, batch {b}",
                f"batch/schedule-b{b}",
                f"batch/gate-b{b}",
                "compression",
                "",
                "x",
                log=True,
            )
            for b in bsizes
        ],
    }
    studies["bias"] = {
        "title": "mlp5: the gate's progress estimate / the actual loss decrease on held-out "
        "images, summed over the run",
        "seeds": list(seeds),
        "arms": [f"bias/{k}-b{b}" for b in bsizes for k in ("actual", "same", "next")],
        "labels": {
            f"bias/{k}-b{b}": f"{k}, batch {b}" for b in bsizes for k in ("actual", "same", "next")
        },
        "columns": [["progress", "summed progress", ""]],
        "pairs": [
            _pair(
                f"{k}-batch estimate / actual decrease, batch {b}",
                f"bias/actual-b{b}",
                f"bias/{k}-b{b}",
                "progress",
                "",
                "x",
                log=True,
            )
            for b in bsizes
            for k in ("same", "next")
        ],
    }
    return {"settings": settings, "studies": studies}


def _pair(
    label: str, a: str, b: str, metric: str, expected: str, unit: str = "accuracy", log=False
) -> dict[str, Any]:
    out = {"label": label, "a": a, "b": b, "metric": metric, "unit": unit, "expected": expected}
    if log:
        out["scale"] = "log_ratio"
    return out


def tasks(proto: dict[str, Any]) -> list[Task]:
    s = proto["settings"]
    seeds = proto["studies"]["batch"]["seeds"]
    budgets = list(s["budgets"])
    out: list[Task] = []
    for seed in seeds:
        for model in MODELS:
            out.append(
                Task(
                    f"{model}-seed{seed}-dense",
                    seed,
                    "budget_run",
                    {"model": model, "arm": "dense"},
                )
            )
            out += [
                Task(f"{model}-seed{seed}-{b}", seed, "budget_run", {"model": model, "arm": b})
                for b in budgets
            ]
            out += [
                Task(
                    f"{model}-seed{seed}-crit-{c}",
                    seed,
                    "criteria_run",
                    {"model": model, "criterion": c},
                )
                for c in CRITERIA
            ]
        out += [
            Task(f"batch-seed{seed}-b{b}", seed, "batch_run", {"batch": b})
            for b in s["batch_sizes"]
        ]
        out += [
            Task(f"bias-seed{seed}-b{b}", seed, "bias_run", {"batch": b}) for b in s["batch_sizes"]
        ]
    return out


# --------------------------------------------------------------------------- training
def make_model(name: str) -> nn.Module:
    if name == "mlp5":
        layers: list[nn.Module] = [nn.Flatten()]
        width = 784
        for _ in range(5):
            layers += [nn.Linear(width, 256), nn.ReLU()]
            width = 256
        return nn.Sequential(*layers, nn.Linear(width, 10))
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 49, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def _weights(model: nn.Module) -> list[tuple[nn.Module, str]]:
    return [(m, "weight") for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _data(ctx: Context, model: str) -> tuple[torch.Tensor, ...]:
    s = ctx.proto["settings"]
    return fashion_subsets(ctx.data_dir, ctx.seed, s["n_train"][model], s["n_val"], s["n_test"])


def _train(
    ctx: Context,
    model_name: str,
    data: tuple,
    *,
    batch_size: int | None = None,
    reg_options: dict[str, Any] | None = None,
    gmp: str | None = None,
    target: float | None = None,
) -> dict[str, Any]:
    """One run: the model of ``model_name`` from the seed's initialisation, SGD with a
    cosine lr, optionally a ``CoherentStrongReg`` (``reg_options``) or gradual magnitude
    pruning (``gmp``: "layer" or "global", to ``target``)."""
    s = ctx.proto["settings"]
    x, y, vx, vy, ex, ey = data
    torch.set_flush_denormal(True)
    seed_torch(ctx.seed, 0, 1 if model_name == "cnn" else 0)  # the same init for every run
    model = make_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"])
    bs = batch_size or s["batch_size"]
    per_epoch = steps_per_epoch(len(y), bs)
    total = s["epochs"] * per_epoch
    reg = None
    if reg_options is not None:
        reg = CoherentStrongReg(
            model.named_parameters(), optimizer=opt, history_size=total, **reg_options
        )
        reg.attach()
    pruner = _Gmp(model, gmp, target, per_epoch, total) if gmp else None
    step, cpu = 0, time.process_time()
    for epoch in range(s["epochs"]):
        for xb, yb in batches(x, y, bs, generator(ctx.seed, 3, epoch)):
            set_lr(opt, cosine(s["lr"], step, total))
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            step += 1
            if pruner is not None:
                pruner.step(step)
    if pruner is not None:
        pruner.finish()
    report = compression_report(model)
    out = {
        "val_acc": accuracy(model, vx, vy),
        eval_key(): accuracy(model, ex, ey),
        "sparsity": report.sparsity,
        "compression": report.compression_ratio,
        "train_cpu_seconds": time.process_time() - cpu,
        "steps": total,
    }
    if reg is not None:
        history = list(reg.history)
        out["on_fraction"] = sum(bool(h.get("active")) for h in history) / max(len(history), 1)
        out["frozen_at"] = reg.state_dict()["frozen_at"]
        reg.check_budget() if isinstance(reg.criterion, Budget) else None
    return out


class _Gmp:
    """Gradual magnitude pruning with ``torch.nn.utils.prune``: the sparsity of
    ``CubicSL.sparsity_compute_fn`` (Zhu & Gupta's cubic ramp, ``torch.ao.pruning``), from
    step ``per_epoch`` to ``0.8 * total``, pruned every ``max(1, per_epoch // 10)`` steps."""

    def __init__(self, model: nn.Module, how: str, target: float, per_epoch: int, total: int):
        self.model, self.how, self.target = model, how, target
        self.start, self.every = per_epoch, max(1, per_epoch // 10)
        self.span = max(1, (int(0.8 * total) - per_epoch) // self.every)
        self.params = _weights(model)

    def sparsity_at(self, step: int) -> float:
        return CubicSL.sparsity_compute_fn(
            0.0, self.target, step, self.start, self.every, self.span, initially_zero=True
        )

    def step(self, step: int) -> None:
        if step < self.start or (step - self.start) % self.every:
            return
        level = self.sparsity_at(step)
        if self.how == "global":
            total = sum(m.weight.numel() for m, _ in self.params)
            pruned = sum(int((m.weight == 0).sum()) for m, _ in self.params)
            extra = round(level * total) - pruned
            if extra > 0:
                prune.global_unstructured(
                    self.params, pruning_method=prune.L1Unstructured, amount=extra
                )
            return
        for m, name in self.params:
            extra = round(level * m.weight.numel()) - int((m.weight == 0).sum())
            if extra > 0:
                prune.l1_unstructured(m, name, amount=extra)

    def finish(self) -> None:
        for m, name in self.params:
            if prune.is_pruned(m):
                prune.remove(m, name)


def budget_run(ctx: Context) -> dict[str, Any]:
    """The dense run, or one budget arm at every level."""
    model, arm = ctx.args["model"], ctx.args["arm"]
    data = _data(ctx, model)
    if arm == "dense":
        return {"arms": {f"{model}-budget/dense": _train(ctx, model, data)}}
    out = {}
    for c, target in LEVELS.items():
        how = BUDGETS[arm][1]
        if isinstance(how, str):  # gradual magnitude pruning
            run = _train(ctx, model, data, gmp=how, target=target)
        else:
            run = _train(ctx, model, data, reg_options={"criterion": Budget(target, **how)})
        run["target"] = target
        out[f"{model}-budget/{arm}-{c}x"] = run
    return {"arms": out}


def criteria_run(ctx: Context) -> dict[str, Any]:
    """One criterion over the strength grid: every run's figures (in ``info``), and the
    criterion's best run at or above each level (chosen on validation)."""
    model, crit = ctx.args["model"], ctx.args["criterion"]
    data = _data(ctx, model)
    runs = []
    for strength in ctx.proto["settings"]["strengths"]:
        run = _train(ctx, model, data, reg_options={"strength": strength, **CRITERIA[crit][1]})
        run["strength"] = strength
        runs.append(run)
    metrics: dict[str, Any] = {"max_compression": max(r["compression"] for r in runs)}
    for lvl in CRITERIA_LEVELS:
        ok = [r for r in runs if r["compression"] >= lvl]
        best = max(ok, key=lambda r: r["val_acc"]) if ok else None
        metrics[f"acc_at_{lvl}x"] = best[eval_key()] if best else None
        metrics[f"strength_at_{lvl}x"] = best["strength"] if best else None
    return {"arms": {f"{model}-criteria/{crit}": metrics}, "info": {"runs": runs}}


def batch_run(ctx: Context) -> dict[str, Any]:
    b = ctx.args["batch"]
    data = _data(ctx, "mlp5")
    out = {}
    for crit, (_, opts) in CRITERIA.items():
        out[f"batch/{crit}-b{b}"] = _train(
            ctx, "mlp5", data, batch_size=b, reg_options={"strength": BATCH_STRENGTH, **opts}
        )
    return {"arms": out}


@torch.no_grad()
def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(F.cross_entropy(model(x), y))


def bias_run(ctx: Context) -> dict[str, Any]:
    """Plain SGD on MLP5 at one batch size; at ~``bias_points`` steps, the step scored by the
    same-batch and next-batch estimates and by the actual decrease of the held-out loss."""
    s = ctx.proto["settings"]
    b = ctx.args["batch"]
    x, y, vx, vy, _, _ = _data(ctx, "mlp5")
    hx, hy = vx[: s["bias_images"]], vy[: s["bias_images"]]
    seed_torch(ctx.seed, 0, 0)
    model = make_model("mlp5")
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"])
    params = [p for _, p in model.named_parameters()]
    per_epoch = steps_per_epoch(len(y), b)
    total = s["epochs"] * per_epoch
    every = max(1, total // s["bias_points"])
    sums = {"actual": 0.0, "same": 0.0, "next": 0.0}
    points: list[dict[str, float]] = []
    pending: list[torch.Tensor] | None = None  # the measured step's change, awaiting g_{t+1}
    step = 0
    for epoch in range(s["epochs"]):
        for xb, yb in batches(x, y, b, generator(ctx.seed, 3, epoch)):
            set_lr(opt, cosine(s["lr"], step, total))
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            grads = [p.grad.detach().clone() for p in params]  # type: ignore[union-attr]
            if pending is not None:  # the next batch's gradient at w_{t+1}
                nxt = float(sum((g * d).sum() for g, d in zip(grads, pending, strict=True)))
                points[-1]["next"] = nxt
                sums["next"] += nxt
                pending = None
            measure = step % every == every // 2 and step + 1 < total
            if measure:
                before = [p.detach().clone() for p in params]
                loss0 = _loss(model, hx, hy)
            opt.step()
            if measure:
                d = [w0 - p.detach() for w0, p in zip(before, params, strict=True)]
                same = float(sum((g * di).sum() for g, di in zip(grads, d, strict=True)))
                actual = loss0 - _loss(model, hx, hy)
                points.append({"step": step, "same": same, "actual": actual})
                sums["same"] += same
                sums["actual"] += actual
                pending = d
            step += 1
    return {
        "arms": {f"bias/{k}-b{b}": {"progress": v} for k, v in sums.items()},
        "info": {"points": points, "every": every},
    }


# --------------------------------------------------------------------------- report
def premise(
    proto: dict[str, Any], seeds: list[dict[str, Any]], infos: dict[str, Any]
) -> list[dict[str, Any]]:
    checks = []
    for model in MODELS:
        reached = [
            abs(rec["arms"][f"{model}-budget/budget-{c}x"]["sparsity"] - t)
            for rec in seeds
            for c, t in LEVELS.items()
            if f"{model}-budget/budget-{c}x" in rec["arms"]
        ]
        checks.append(
            check(
                f"{model}: the budget reaches its target (largest |sparsity - target| over levels "
                "and seeds)",
                max(reached) if reached else None,
                "<=",
                0.01,
            )
        )
        gmp = [
            abs(rec["arms"][f"{model}-budget/gmp-{c}x"]["sparsity"] - t)
            for rec in seeds
            for c, t in LEVELS.items()
            if f"{model}-budget/gmp-{c}x" in rec["arms"]
        ]
        checks.append(
            check(
                f"{model}: gradual magnitude pruning reaches its target (largest |sparsity - "
                "target|)",
                max(gmp) if gmp else None,
                "<=",
                0.01,
            )
        )
        dense = [
            rec["arms"][f"{model}-budget/dense"]["val_acc"]
            for rec in seeds
            if f"{model}-budget/dense" in rec["arms"]
        ]
        checks.append(
            check(
                f"{model}: the dense model learnt (validation accuracy, mean over seeds)",
                mean(dense),
                ">=",
                0.8,
                "Fashion-MNIST; chance is 0.1",
            )
        )
    return checks


def describe(proto: dict[str, Any]) -> list[str]:
    s = proto["settings"]
    n = s["n_train"]
    where = "validation" if proto["stage"] != "confirm" else "test"
    return [
        f"Protocol: Fashion-MNIST, {n['mlp5']:,} (MLP5) / {n['cnn']:,} (CNN) training and "
        f"{s['n_val']:,} validation images (disjoint, drawn per seed); accuracies reported on "
        f"the {where} split; {s['epochs']} epochs of SGD (lr {s['lr']}, momentum "
        f"{s['momentum']}, cosine per step to 0, batch {s['batch_size']}, no weight decay). "
        "Budget study: every run trained to its level (5x, 10x, 30x: sparsity 0.8, 0.9, "
        "0.9667 of the conv/linear weights); `CoherentStrongReg(target_sparsity=s)` against "
        "gradual magnitude pruning (`torch.nn.utils.prune` with `torch.ao.pruning`'s cubic "
        "schedule, per layer and global, from epoch 1 to 80 % of the steps). Criteria study: "
        f"strengths {s['strengths']}, per seed the best run on validation among those at or "
        "above 10x (30x) compression. Batch study: strength "
        f"{s['batch_strength']:g} at batch {s['batch_sizes']}. Bias study: the progress "
        "estimates of the gate against the actual decrease of the loss on "
        f"{s['bias_images']:,} held-out validation images, summed over "
        f"~{s['bias_points']} steps.",
    ]


def extra_tables(result: dict[str, Any]) -> list[str]:
    """The criteria study's whole sweep (mean over seeds)."""
    ek = "test_acc" if result["stage"] == "confirm" else "val_acc"
    lines = ["The criteria's strength sweep (mean over seeds; compression geometric):", ""]
    lines += [
        "| model | criterion | strength | accuracy | compression | on |",
        "|---|---|---|---|---|---|",
    ]
    for model in MODELS:
        for crit in CRITERIA:
            runs: dict[float, list[dict[str, Any]]] = {}
            for key, info in result["infos"].items():
                if key.startswith(f"{model}-seed") and key.endswith(f"-crit-{crit}"):
                    for r in info.get("runs", []):
                        runs.setdefault(r["strength"], []).append(r)
            for strength, rs in sorted(runs.items()):
                comp = math.exp(mean([math.log(r["compression"]) for r in rs]) or 0.0)
                lines.append(
                    f"| {model} | {crit} | {strength:g} | {mean([r[ek] for r in rs]):.4f} | "
                    f"{comp:.1f}x | {mean([r.get('on_fraction', 1.0) for r in rs]):.2f} |"
                )
    lines.append("")
    return lines


def extra_panels(result: dict[str, Any]) -> list:
    ek = "test_acc" if result["stage"] == "confirm" else "val_acc"

    def panel(model: str):
        def draw(ax) -> None:
            arms = result["protocol"]["settings"]["budgets"]
            for arm in arms:
                xs, ys = [], []
                for c in LEVELS:
                    vals = [
                        rec["arms"].get(f"{model}-budget/{arm}-{c}x", {}).get(ek)
                        for rec in result["seeds"]
                    ]
                    vals = [v for v in vals if v is not None]
                    if vals:
                        xs.append(c)
                        ys.append(sum(vals) / len(vals))
                ax.plot(xs, ys, "o-", label=arm, markersize=4)
            dense = [
                rec["arms"].get(f"{model}-budget/dense", {}).get(ek) for rec in result["seeds"]
            ]
            dense = [v for v in dense if v is not None]
            if dense:
                ax.axhline(sum(dense) / len(dense), color="black", lw=0.8, label="dense")
            ax.set_xscale("log")
            ax.set_xlabel("compression (trained to it)")
            ax.set_ylabel(ek.replace("_acc", " accuracy") + " (mean over seeds)")
            ax.set_title(f"{model}: budget vs gradual magnitude pruning", fontsize=9)
            ax.legend(fontsize=6)

        return draw

    return [panel(m) for m in MODELS]
