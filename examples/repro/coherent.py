"""CoherentStrongReg: a strength sweep on two models against always-on and delayed strong L1.

Two models on Fashion-MNIST subsets, paired seeds (a seed fixes the data subsets and the
initialisation of every run of every method):

* ``mlp5``: an MLP with 5 hidden layers of 256 (784-256x5-10, 465k weights), deep enough
  for strong L1 to collapse training;
* ``cnn``: a small CNN (conv 8-16-32, fc 64; 110k weights).

SGD (momentum 0.9, cosine lr per step to 0, batch 128). Methods, each over a strength grid:

* ``none``: no regulariser (once);
* ``always-sub``: L1 as a subgradient in the gradient on every step (zero crossings
  truncated: exact zeros);
* ``always-prox``: proximal L1 (soft-threshold by lr x strength) on every step;
* ``delayed``: proximal L1 from epoch 3 on (Delayed Strong Regularization, the authors'
  earlier method);
* ``coherent``: ``CoherentStrongReg(params, strength=s, optimizer=opt)`` with every other
  setting at its default (descent gate, automatic warm-up, proximal L1);
* ``ratio`` (the MLP only): the library's first default (norm-ratio gate, subgradient L1).

The subgradient forms act through the momentum buffer, so their strengths are ~10x weaker
than the proximal ones for the same effect; their grid is shifted by 10x. A front is
compared, not a strength.

Statistic, per seed and method: the largest compression (dense / non-zero weights) among the
strengths whose *validation* accuracy is within ``delta`` points of the unregularised run's
(1 and 3 points; 1.0 when no strength qualifies), reported with that run's *test* accuracy;
paired differences of its log10 between the coherent gate and each baseline. The sweep's
fronts (mean over seeds) are plotted and tabulated.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import torch
from torch import nn

from repro.common import Context, Task, check, mean, seed_torch
from repro.train import (
    accuracy,
    cosine,
    eval_key,
    fashion_subsets,
    generator,
    set_lr,
    steps_per_epoch,
)
from repro.train import train_epoch as _train_epoch
from torch_recal import CoherentStrongReg, compression_report

CARD = "coherent.md"
PROX_GRID = (3e-3, 4.5e-3, 6e-3, 1e-2, 3e-2, 1e-1)
SUB_GRID = tuple(round(s / 10, 12) for s in PROX_GRID)
NO_FREEZE = {"freeze_below": None}
METHODS = {  # name: (label, grid, CoherentStrongReg options; None: no regulariser)
    "none": ("no regulariser", (0.0,), None),
    "always-sub": (
        "always-on L1, subgradient",
        SUB_GRID,
        {"l1_mode": "subgradient", "criterion": "always", "warmup": 0, **NO_FREEZE},
    ),
    "always-prox": (
        "always-on L1, proximal",
        PROX_GRID,
        {"criterion": "always", "warmup": 0, **NO_FREEZE},
    ),
    "delayed": (
        "delayed L1, proximal (from epoch 3)",
        PROX_GRID,
        {"criterion": "always", "warmup": 0, "delay_epochs": 2, **NO_FREEZE},
    ),
    "delayed-freeze": (
        "delayed L1 + frozen zero pattern at the end",
        PROX_GRID,
        {"criterion": "always", "warmup": 0, "delay_epochs": 2},
    ),
    "coherent-nofreeze": ("CoherentStrongReg, no freeze (the gate alone)", PROX_GRID, NO_FREEZE),
    "coherent": ("CoherentStrongReg (defaults)", PROX_GRID, {}),
    "ratio": (
        "first default (ratio rule, subgradient)",
        SUB_GRID,
        {"criterion": "ratio", "l1_mode": "subgradient", "warmup": 0, **NO_FREEZE},
    ),
}
MODELS = {
    "mlp5": {"methods": list(METHODS), "n_train": 10_000},
    "cnn": {"methods": [m for m in METHODS if m != "ratio"], "n_train": 5_000},
}
HEADLINE = tuple(
    (f"{m}-front", label)
    for m in MODELS
    for label in (
        "coherent - always-prox: accuracy at 10x",
        "coherent - delayed: accuracy at 30x",
        "coherent at 5x - no regulariser",
    )
)  # (study, pair label) shown in the README
BASELINES = ("always-prox", "delayed", "always-sub", "delayed-freeze", "coherent-nofreeze")
DELTAS = (1,)  # accuracy points below the unregularised model (validation)
LEVELS = (5, 10, 30, 100)  # compression levels at which the fronts are compared
COLLAPSED = 0.2  # test accuracy at or below this is a collapsed run (chance is 0.1)


def protocol(quick: bool, seeds: list[int] | None) -> dict[str, Any]:
    seeds = seeds if seeds is not None else list(range(1 if quick else 3))
    settings = {
        "data": "Fashion-MNIST: train and validation subsets drawn per seed (disjoint) from the "
        "60,000 training images; test subset from the 10,000 test images",
        "n_train": {m: (512 if quick else c["n_train"]) for m, c in MODELS.items()},
        "n_val": 512 if quick else 2_000,
        "n_test": 512 if quick else 5_000,
        "epochs": 2 if quick else 15,
        "batch_size": 128,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 0.0,
        "lr_schedule": "cosine per step to 0",
        "grids": {
            "proximal": list(PROX_GRID[1::3] if quick else PROX_GRID),
            "subgradient": list(SUB_GRID[1::3] if quick else SUB_GRID),
        },
        "methods": {
            name: {"label": label, "options": opts} for name, (label, _, opts) in METHODS.items()
        },
        "models": {
            "mlp5": "Flatten, 5 x (Linear(., 256), ReLU), Linear(256, 10)",
            "cnn": "Conv(1,8,3)-ReLU-MaxPool, Conv(8,16,3)-ReLU-MaxPool, Conv(16,32,3)-ReLU, "
            "Linear(1568, 64)-ReLU, Linear(64, 10)",
        },
        "regularised": "conv/linear weights (CoherentStrongReg's default selection); "
        "compression counts their exact zeros",
        "statistic": "per seed and method (1) the largest compression among the strengths whose "
        "validation accuracy is within 1 point of the unregularised run's (1.0 if none), and "
        "that run's test accuracy; paired differences of log10(compression); (2) the front: "
        "the test accuracy at 5x, 10x, 30x and 100x compression, read off the seed's "
        "accuracy/compression front (its Pareto-optimal runs with the unregularised run as 1x, "
        "linear in log10(compression), collapsed runs excluded); paired differences",
        "how_chosen": "the gate's criterion and defaults were chosen in exploration on seed 0's "
        "validation split of this data (MLP5 and the CNN) before this suite was run; the "
        "strength of each method is chosen on the validation split by the statistic above",
    }
    studies: dict[str, Any] = {}
    for model, cfg in MODELS.items():
        methods = cfg["methods"]
        for delta in DELTAS:
            arms = [f"{model}-{delta}pt/{m}" for m in methods]
            labels = {f"{model}-{delta}pt/{m}": METHODS[m][0] for m in methods}
            pairs = [
                {
                    "label": f"coherent - {b}: log10 compression",
                    "a": f"{model}-{delta}pt/{b}",
                    "b": f"{model}-{delta}pt/coherent",
                    "metric": "log10_compression",
                    "unit": "",
                    "expected": "+",
                }
                for b in BASELINES
            ]
            studies[f"{model}-{delta}pt"] = {
                "title": f"{model}: most compression within {delta} pt of the unregularised",
                "seeds": list(seeds),
                "arms": arms,
                "labels": labels,
                "columns": [
                    ["compression", "compression", "x"],
                    [eval_key(), "accuracy", "accuracy"],
                    ["strength", "strength chosen", ""],
                ],
                "pairs": pairs,
            }
    for model, cfg in MODELS.items():
        methods = cfg["methods"]
        front_pairs = (
            [
                {
                    "label": f"coherent - {b}: accuracy at {c}x",
                    "a": f"{model}-front/{b}",
                    "b": f"{model}-front/coherent",
                    "metric": f"acc_at_{c}x",
                    "unit": "accuracy",
                    "expected": "+",
                }
                for c in LEVELS
                for b in ("always-prox", "delayed", "delayed-freeze", "coherent-nofreeze")
            ]
            + [
                {
                    "label": f"coherent at {c}x - no regulariser",
                    "a": f"{model}-front/none",
                    "b": f"{model}-front/coherent",
                    "metric": f"acc_at_{c}x",
                    "unit": "accuracy",
                    "expected": "",  # the accuracy that compression costs: no direction claimed
                }
                for c in LEVELS[:2]
            ]
        )
        studies[f"{model}-front"] = {
            "title": f"{model}: test accuracy on each seed's front at a given compression",
            "seeds": list(seeds),
            "arms": [f"{model}-front/{m}" for m in methods],
            "labels": {f"{model}-front/{m}": METHODS[m][0] for m in methods},
            "columns": [[f"acc_at_{c}x", f"accuracy at {c}x", "accuracy"] for c in LEVELS]
            + [["max_compression", "most compression before collapse", "x"]],
            "pairs": front_pairs,
        }
    return {"settings": settings, "studies": studies}


def tasks(proto: dict[str, Any]) -> list[Task]:
    seeds = next(iter(proto["studies"].values()))["seeds"]
    return [
        Task(f"{model}-seed{s}-{method}", s, "sweep", {"model": model, "method": method})
        for model, cfg in MODELS.items()
        for s in seeds
        for method in cfg["methods"]
    ]


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


def _data(ctx: Context, model: str) -> tuple[torch.Tensor, ...]:
    s = ctx.proto["settings"]
    n_train = s["n_train"][model]
    return fashion_subsets(ctx.data_dir, ctx.seed, n_train, s["n_val"], s["n_test"])


def _one_run(
    ctx: Context, model_name: str, method: str, strength: float, data: tuple
) -> dict[str, Any]:
    s = ctx.proto["settings"]
    x, y, vx, vy, tx, ty = data
    torch.set_flush_denormal(True)  # collapsed runs: tiny weights would run at denormal speed
    seed_torch(ctx.seed, 0, 1 if model_name == "cnn" else 0)  # the same init for every run
    model = make_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=s["lr"], momentum=s["momentum"])
    per_epoch = steps_per_epoch(len(y), s["batch_size"])
    total = s["epochs"] * per_epoch
    options = METHODS[method][2]
    reg = None
    if options is not None:
        kw = {k: v for k, v in options.items() if k != "delay_epochs"}
        if "delay_epochs" in options:
            kw["delay"] = options["delay_epochs"] * per_epoch
        reg = CoherentStrongReg(
            model.named_parameters(), strength=strength, optimizer=opt, history_size=total, **kw
        )
        reg.attach()
    val_curve, cpu = [], 0.0
    for e in range(s["epochs"]):
        st = _train_epoch(
            model,
            opt,
            x,
            y,
            batch_size=s["batch_size"],
            gen=generator(ctx.seed, 3, e),
            before_step=lambda i, e=e: set_lr(opt, cosine(s["lr"], e * per_epoch + i, total)),
        )
        cpu += st.cpu_seconds
        if method == "none":
            val_curve.append(accuracy(model, vx, vy))
    report = compression_report(model)
    history = list(reg.history) if reg is not None else []
    active = [bool(h.get("active")) for h in history]
    gated = [bool(h.get("active")) for h in history if not h.get("frozen")]  # the gate's own
    out = {
        "strength": strength,
        "val_acc": accuracy(model, vx, vy),
        eval_key(): accuracy(model, tx, ty),
        "train_acc": accuracy(model, x, y),
        "compression": report.compression_ratio,
        "on_fraction": sum(active) / len(active) if active else 0.0,
        "switches": sum(a != b for a, b in itertools.pairwise(gated)),
        "warmup_start": reg.state_dict()["ramp_start"] if reg is not None else None,
        "frozen_at": reg.state_dict()["frozen_at"] if reg is not None else None,
        "total_steps": total,
        "train_cpu_seconds": cpu,
    }
    if val_curve:
        out["val_curve"] = val_curve
    return out


def sweep(ctx: Context) -> dict[str, Any]:
    model, method = ctx.args["model"], ctx.args["method"]
    grids = ctx.proto["settings"]["grids"]
    grid = (
        (0.0,)
        if method == "none"
        else grids["subgradient" if METHODS[method][1] is SUB_GRID else "proximal"]
    )
    data = _data(ctx, model)
    t0 = time.perf_counter()
    runs = [_one_run(ctx, model, method, float(s), data) for s in grid]
    return {
        "info": {
            "model": model,
            "method": method,
            "runs": runs,
            "wall_seconds": time.perf_counter() - t0,
        }
    }


def _runs(infos: dict[str, Any], model: str, seed: int, method: str) -> list[dict[str, Any]]:
    return infos.get(f"{model}-seed{seed}-{method}", {}).get("runs", [])


def chosen(runs: list[dict[str, Any]], reference_val: float, delta: int) -> dict[str, Any]:
    """The run with the largest compression whose validation accuracy is within ``delta``
    points of ``reference_val`` (the unregularised run's when none qualifies)."""
    ok = [r for r in runs if r["val_acc"] >= reference_val - delta / 100 and r["compression"]]
    if not ok:
        return {}
    return max(ok, key=lambda r: (r["compression"], r["val_acc"]))


def finish(proto: dict[str, Any], seeds: list[dict[str, Any]], infos: dict[str, Any]) -> None:
    """Per seed, the chosen run of every method for every delta (the studies' arms); the
    tasks return only their sweeps (``info``), so the per-seed records are made here."""
    have = {rec["seed"] for rec in seeds}
    for seed in sorted({int(key.split("-seed")[1].split("-")[0]) for key in infos} - have):
        seeds.append({"seed": seed, "arms": {}})
    seeds.sort(key=lambda rec: rec["seed"])
    for rec in seeds:
        seed = rec["seed"]
        for model, cfg in MODELS.items():
            base = _runs(infos, model, seed, "none")
            if not base:
                continue
            ref = base[0]["val_acc"]
            for method in cfg["methods"]:
                runs = None if method == "none" else _runs(infos, model, seed, method)
                rec["arms"][f"{model}-front/{method}"] = front_metrics(base[0], runs)
            for delta in DELTAS:
                for method in cfg["methods"]:
                    pick = chosen(_runs(infos, model, seed, method), ref, delta) or base[0]
                    comp = pick["compression"]
                    rec["arms"][f"{model}-{delta}pt/{method}"] = {
                        "compression": comp,
                        "log10_compression": math.log10(comp)
                        if comp and math.isfinite(comp)
                        else None,
                        eval_key(): pick[eval_key()],
                        "val_acc": pick["val_acc"],
                        "strength": pick["strength"],
                    }


def front_metrics(reference: dict[str, Any], runs: list[dict[str, Any]] | None) -> dict[str, Any]:
    """Test accuracy at each of ``LEVELS`` read off one seed's front of one method (the
    unregularised run is its 1x point; collapsed runs are left out), and the most compression
    reached before collapse. ``runs=None``: the unregularised arm itself, whose accuracy at
    every level is its own (the reference of the pairs)."""
    pts = [(1.0, reference[eval_key()])] + [
        (r["compression"], r[eval_key()])
        for r in runs or []
        if r[eval_key()] > COLLAPSED and r["compression"] and math.isfinite(r["compression"])
    ]
    fr = front(pts)
    out: dict[str, Any] = {"max_compression": max(c for c, _ in pts)}
    for level in LEVELS:
        out[f"acc_at_{level}x"] = interpolate(fr, level) if runs is not None else pts[0][1]
    return out


def interpolate(fr: list[tuple[float, float]], level: float) -> float | None:
    """The front's accuracy at ``level``: linear in log10 compression between its points, the
    first point's below it (that run compresses more, at that accuracy), None beyond it."""
    if level <= fr[0][0]:
        return fr[0][1]
    for (c0, a0), (c1, a1) in itertools.pairwise(fr):
        if c0 <= level <= c1:
            t = (math.log10(level) - math.log10(c0)) / (math.log10(c1) - math.log10(c0))
            return a0 + t * (a1 - a0)
    return None


def front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto front of ``(compression, accuracy)`` points: none has both higher."""
    pts = sorted(points, key=lambda p: (-p[0], -p[1]))
    out, best = [], -math.inf
    for comp, acc in pts:
        if acc > best:
            out.append((comp, acc))
            best = acc
    return sorted(out)


def sweep_means(result: dict[str, Any], model: str, method: str) -> list[dict[str, Any]]:
    """Per strength, the mean over seeds of test accuracy, compression (geometric) and the
    gate's on-fraction."""
    seeds = next(iter(result["protocol"]["studies"].values()))["seeds"]
    by_strength: dict[float, list[dict[str, Any]]] = {}
    for seed in seeds:
        for run in _runs(result["infos"], model, seed, method):
            by_strength.setdefault(run["strength"], []).append(run)
    out = []
    for strength, runs in sorted(by_strength.items()):
        comps = [r["compression"] for r in runs]
        finite = [c for c in comps if c and math.isfinite(c)]
        out.append(
            {
                "strength": strength,
                eval_key(): mean([r[eval_key()] for r in runs]),
                "compression": 10 ** mean([math.log10(c) for c in finite])
                if len(finite) == len(comps)
                else math.inf,
                "on_fraction": mean([r["on_fraction"] for r in runs]),
                "n": len(runs),
            }
        )
    return out


def premise(
    proto: dict[str, Any], seeds: list[dict[str, Any]], infos: dict[str, Any]
) -> list[dict[str, Any]]:
    checks = []
    ids = [rec["seed"] for rec in seeds]
    top = max(proto["settings"]["grids"]["proximal"])
    for model in MODELS:
        collapsed = [
            r[eval_key()]
            for s in ids
            for r in _runs(infos, model, s, "always-prox")
            if r["strength"] == top
        ]
        checks.append(
            check(
                f"{model}: strong L1 collapses always-on training (test accuracy of always-on "
                f"proximal L1 at strength {top:g}, mean over seeds)",
                mean(collapsed),
                "<",
                0.2,
                "chance is 0.1",
            )
        )
        gains = []
        for s in ids:
            curve = (_runs(infos, model, s, "none") or [{}])[0].get("val_curve", [])
            if len(curve) >= 2:
                gains.append((curve[-1] - curve[-min(3, len(curve))]) * 100)
        checks.append(
            check(
                f"{model}: the unregularised run converged (validation accuracy gained over its "
                "last 2 epochs, points, mean over seeds)",
                mean(gains),
                "<",
                0.5,
            )
        )
        switched = [
            float(r["switches"] > 0)
            for s in ids
            for r in _runs(infos, model, s, "coherent")
            if r["strength"] == top
        ]
        checks.append(
            check(
                f"{model}: the gate acted where always-on L1 collapses (fraction of seeds in which "
                f"the coherent gate switched the regulariser off at strength {top:g})",
                mean(switched),
                ">=",
                1.0,
            )
        )
    frozen = [
        r["frozen_at"] / r["total_steps"] if r.get("frozen_at") is not None else 1.0
        for model in MODELS
        for s in ids
        for r in _runs(infos, model, s, "coherent")
    ]
    checks.append(
        check(
            "the default's freeze left most of the training to the regulariser (steps before "
            "the zero pattern froze / all steps, mean over the coherent runs; 1 if it never froze)",
            mean(frozen),
            ">=",
            0.5,
        )
    )
    return checks


def describe(proto: dict[str, Any]) -> list[str]:
    s = proto["settings"]
    n = s["n_train"]
    return [
        f"Protocol: Fashion-MNIST, {n['mlp5']:,} (MLP5) / {n['cnn']:,} (CNN) training and "
        f"{s['n_val']:,} validation images (disjoint, drawn per seed), {s['n_test']:,} test "
        f"images; {s['epochs']} epochs of SGD (lr {s['lr']}, momentum {s['momentum']}, cosine "
        f"per step to 0, batch {s['batch_size']}, no weight decay). The library's default "
        "freezes the zero pattern once the lr is below a tenth of its peak (`freeze_below=0.1`, "
        "the last ~20 % of the steps here); the literature baselines (always-on, delayed) run "
        "without it, and two ablations separate the gate from the freeze (the gate alone; "
        "delayed L1 with the freeze). Proximal strengths "
        f"{s['grids']['proximal']}; subgradient strengths {s['grids']['subgradient']} (they act "
        "through the momentum buffer, about 10x stronger). The delayed baseline starts at epoch "
        "3. Two statistics per seed and method: (1) the front: the test accuracy at 5x, 10x, 30x "
        "and 100x compression read off the seed's accuracy/compression front (its "
        "Pareto-optimal runs, the unregularised run as the 1x point, linear in "
        "log10(compression); '-' where the method collapses before that compression), paired "
        "differences against always-on and delayed L1 and against no regulariser; (2) the "
        "strength chosen on the validation split: the most compression within 1 point of the "
        "unregularised validation accuracy, with that run's test accuracy, paired differences "
        "of log10(compression).",
    ]


def extra_tables(result: dict[str, Any]) -> list[str]:
    """The whole sweep: per method and strength, mean test accuracy, compression and the
    fraction of steps the regulariser was on."""
    lines = ["The whole sweep (mean over seeds; compression as a geometric mean):", ""]
    for model, cfg in MODELS.items():
        lines += [
            f"**{model}**",
            "",
            "| method | strength | test accuracy | compression | reg. on |",
            "|---|---|---|---|---|",
        ]
        for method in cfg["methods"]:
            for row in sweep_means(result, model, method):
                comp = row["compression"]
                lines.append(
                    f"| {METHODS[method][0]} | {row['strength']:g} | {row[eval_key()]:.4f} | "
                    f"{'inf' if not math.isfinite(comp) else f'{comp:.1f}x'} | "
                    f"{row['on_fraction']:.2f} |"
                )
        lines.append("")
    return lines


def extra_panels(result: dict[str, Any]) -> list:
    colors = {
        "none": "black",
        "always-sub": "tab:purple",
        "always-prox": "tab:red",
        "delayed": "tab:orange",
        "delayed-freeze": "tab:brown",
        "coherent-nofreeze": "tab:olive",
        "coherent": "tab:green",
        "ratio": "tab:gray",
    }

    def panel(model: str):
        def draw(ax) -> None:
            for method in MODELS[model]["methods"]:
                rows = [
                    r for r in sweep_means(result, model, method) if math.isfinite(r["compression"])
                ]
                if not rows:
                    continue
                pts = [(r["compression"], r[eval_key()]) for r in rows]
                ax.plot(
                    *zip(*pts, strict=True), "o", color=colors[method], alpha=0.35, markersize=4
                )
                fr = front(pts)
                ax.plot(*zip(*fr, strict=True), "-", color=colors[method], label=METHODS[method][0])
            ax.set_xscale("log")
            ax.set_xlabel("compression (dense / non-zero), mean over seeds")
            ax.set_ylabel("test accuracy")
            ax.set_title(f"{model}: accuracy / compression front", fontsize=9)
            ax.legend(fontsize=6)

        return draw

    return [panel(m) for m in MODELS]
