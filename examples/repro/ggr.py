"""GGR: refining a converged classifier with a generative reference gradient, paired seeds.

Per seed (cached): a small CNN (the one of ``examples/ggr.py``) is trained to convergence on a
Fashion-MNIST subset (SGD with a cosine to 0), a ``ReferenceDecoder`` mirroring its first conv
is fitted on the same images, and the cost of a CE step and of a CE + GGR step is measured
(CPU time, interleaved). Then, from the same converged weights, with the same batches:

* ``ce``: cross-entropy refinement (a short cosine from a small lr): this is also the premise
  check, since on a converged model it must change test accuracy by < 0.3 points;
* ``ggr-w<weight>``: CE + ``GenerativeGradientLoss`` (cosine discrepancy) at each weight of
  the grid; ``ggr-val`` is, per seed, the weight with the best validation accuracy (the
  validation split is carved from the training data; the test split is never used to choose);
* ``ce-matched``: CE refinement given the compute of the GGR refinement (its steps times the
  measured cost ratio, plus the decoder's fitting time in CE steps), the lr schedule stretched
  to the longer run.

Mechanism logged: the mean per-filter variance of the first conv
(``first_layer_filter_stats``), before and after each refinement.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from ggr import SmallCNN  # examples/ggr.py: the same model as the example
from torch import nn
from torch.nn import functional as F

from repro.common import Context, Task, check, mean, seed_torch
from repro.train import (
    accuracy,
    batches,
    cosine,
    eval_key,
    fashion_subsets,
    generator,
    set_lr,
    sgd,
    steps_per_epoch,
    train_epoch,
)
from torch_recal import GenerativeGradientLoss, ReferenceDecoder, first_layer_filter_stats

CARD = "generative.md"
HEADLINE = (
    ("fashion", "GGR (val) - CE"),
    ("fashion", "GGR (val) - CE compute-matched"),
)  # (study, pair label) shown in the README
STUDY = "fashion"
WEIGHTS_FULL = (0.01, 0.03, 0.1, 0.3)
WEIGHTS_QUICK = (0.1, 1.0)


def _wname(w: float) -> str:
    return f"ggr-w{w:g}"


def protocol(quick: bool, seeds: list[int] | None) -> dict[str, Any]:
    seeds = seeds if seeds is not None else list(range(2 if quick else 5))
    ek = eval_key()
    weights = WEIGHTS_QUICK if quick else WEIGHTS_FULL
    settings = {
        "data": "Fashion-MNIST: train and validation subsets drawn per seed (disjoint) from the "
        "60,000 training images; test subset from the 10,000 test images",
        "n_train": 256 if quick else 10_000,
        "n_val": 256 if quick else 2_000,
        "n_test": 256 if quick else 10_000,
        "model": "SmallCNN of examples/ggr.py: conv1 1->16 3x3 + BN + ReLU, two stride-2 conv "
        "stages (32, 64), GAP, linear",
        "base": {
            "epochs": 1 if quick else 15,
            "batch_size": 128,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "lr_schedule": "cosine per step to 0",
        },
        "decoder": {
            "epochs": 1 if quick else 2,
            "lr": 1e-3,
            "batch_size": 128,
            "what": "ReferenceDecoder.for_layer(model.conv1), fit() defaults (Adam)",
        },
        "refine": {
            "epochs": 1 if quick else 3,
            "batch_size": 128,
            "lr": 0.005,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "lr_schedule": "cosine per step from lr to 0",
        },
        "ggr": {"weights": list(weights), "discrepancy": "cosine", "every": 1, "ema": None},
        "cost_steps": 2 if quick else 8,
        "how_chosen": "the GGR weight per seed on the validation split (grid above; after a "
        "one-seed sizing run in which weights 0.1-1.0 all lost validation accuracy, the grid "
        "was moved down to 0.01-0.3); everything else fixed in advance (the premise checks that "
        "the 15-epoch base has converged) and sized to the time budget (15 min on 2 cores)",
    }
    arms = ["base", "ce", *[_wname(w) for w in weights], "ggr-val", "ce-matched"]
    q = [f"{STUDY}/{a}" for a in arms]
    labels = {
        f"{STUDY}/base": "converged base model (no refinement)",
        f"{STUDY}/ce": "+ CE refinement",
        f"{STUDY}/ce-matched": "+ CE refinement, compute-matched to GGR",
        f"{STUDY}/ggr-val": "+ CE + GGR, weight chosen on validation",
    }
    labels.update({f"{STUDY}/{_wname(w)}": f"+ CE + GGR, weight {w:g}" for w in weights})

    def pair(label: str, a: str, b: str, metric: str = ek, unit: str = "accuracy"):
        return {
            "label": label,
            "a": f"{STUDY}/{a}",
            "b": f"{STUDY}/{b}",
            "metric": metric,
            "unit": unit,
            "expected": "+",
        }

    pairs = [
        pair("GGR (val) - CE", "ce", "ggr-val"),
        pair("GGR (val) - CE compute-matched", "ce-matched", "ggr-val"),
        *[pair(f"GGR w={w:g} - CE", "ce", _wname(w)) for w in weights],
        pair("conv1 filter variance: GGR (val) - CE", "ce", "ggr-val", "conv1_filter_var", ""),
    ]
    return {
        "settings": settings,
        "studies": {
            STUDY: {
                "title": "Fashion-MNIST, small CNN, refinement of a converged model",
                "seeds": list(seeds),
                "arms": q,
                "labels": labels,
                "columns": [
                    [ek, ek.replace("_acc", " accuracy"), "accuracy"],
                    ["val_acc", "validation accuracy", "accuracy"],
                    ["conv1_filter_var", "conv1 mean filter variance", ""],
                ],
                "pairs": pairs,
            }
        },
    }


def tasks(proto: dict[str, Any]) -> list[Task]:
    seeds = proto["studies"][STUDY]["seeds"]
    weights = proto["settings"]["ggr"]["weights"]
    out = [Task(f"seed{s}-base", s, "prepare") for s in seeds]
    for s in seeds:
        dep = (f"seed{s}-base",)
        out += [
            Task(f"seed{s}-{_wname(w)}", s, "refine", {"arm": _wname(w), "weight": w}, dep)
            for w in weights
        ]
        out.append(Task(f"seed{s}-ce-matched", s, "refine", {"arm": "ce-matched"}, dep))
        out.append(Task(f"seed{s}-ce", s, "refine", {"arm": "ce"}, dep))
    return out


def data(ctx: Context) -> tuple[torch.Tensor, ...]:
    s = ctx.proto["settings"]
    return fashion_subsets(ctx.data_dir, ctx.seed, s["n_train"], s["n_val"], s["n_test"])


def _ggr_loss(ggr: GenerativeGradientLoss):
    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor):
        logits = model(xb)
        ce = F.cross_entropy(logits, yb)
        return ce + ggr(ce, xb), logits

    return loss_fn


def _evaluate(model: SmallCNN, vx, vy, tx, ty) -> dict[str, float]:
    return {
        "val_acc": accuracy(model, vx, vy),
        eval_key(): accuracy(model, tx, ty),
        "conv1_filter_var": first_layer_filter_stats(model.conv1).mean_variance,
    }


def prepare(ctx: Context) -> dict[str, Any]:
    s = ctx.proto["settings"]
    b, d = s["base"], s["decoder"]
    x, y, vx, vy, tx, ty = data(ctx)
    seed_torch(ctx.seed, 0)
    model = SmallCNN()
    opt = sgd(model.parameters(), b["lr"], momentum=b["momentum"], weight_decay=b["weight_decay"])
    per_epoch = steps_per_epoch(len(y), b["batch_size"])
    total = b["epochs"] * per_epoch
    curve = []
    for epoch in range(b["epochs"]):
        st = train_epoch(
            model,
            opt,
            x,
            y,
            batch_size=b["batch_size"],
            gen=generator(ctx.seed, 3, epoch),
            before_step=lambda i, e=epoch: set_lr(opt, cosine(b["lr"], e * per_epoch + i, total)),
        )
        curve.append(st.train_acc)
    torch.save(model.state_dict(), ctx.cache_path("base.pt"))
    base = _evaluate(model, vx, vy, tx, ty)
    base["train_acc"] = accuracy(model, x, y)
    base["train_curve"] = curve

    seed_torch(ctx.seed, 5)
    decoder = ReferenceDecoder.for_layer(model.conv1)
    loader = [xb for xb, _ in batches(x, y, d["batch_size"], generator(ctx.seed, 6))]
    t0 = time.process_time()
    history = decoder.fit(loader, epochs=d["epochs"], lr=d["lr"])
    decoder_cpu = time.process_time() - t0
    torch.save(decoder.state_dict(), ctx.cache_path("decoder.pt"))

    ce_step, ggr_step = _step_costs(ctx, model, decoder, x, y)
    return {
        "arms": {f"{STUDY}/base": base},
        "info": {
            "decoder_cpu_seconds": decoder_cpu,
            "decoder_loss": history,
            "ce_step_cpu_seconds": ce_step,
            "ggr_step_cpu_seconds": ggr_step,
            "ggr_step_cost_ratio": ggr_step / ce_step,
        },
    }


def _step_costs(ctx: Context, model: SmallCNN, decoder, x, y) -> tuple[float, float]:
    """Median CPU seconds of a CE step and of a CE + GGR step, measured interleaved."""
    s = ctx.proto["settings"]
    n = s["cost_steps"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    copies = []
    for _ in range(2):
        m = SmallCNN()
        m.load_state_dict(state)
        copies.append((m, sgd(m.parameters(), 1e-6)))
    ggr = GenerativeGradientLoss(
        copies[1][0].conv1.weight, decoder, weight=s["ggr"]["weights"][0], discrepancy="cosine"
    )
    fns = [None, _ggr_loss(ggr)]
    times: list[list[float]] = [[], []]
    xb, yb = next(batches(x, y, s["refine"]["batch_size"], generator(ctx.seed, 7)))
    for i in range(n + 2):
        for k, (m, opt) in enumerate(copies):
            t0 = time.process_time()
            if fns[k] is None:
                loss = F.cross_entropy(m(xb), yb)
            else:
                loss, _ = fns[k](m, xb, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if i >= 2:  # two warm-up steps
                times[k].append(time.process_time() - t0)
    return statistics.median(times[0]), statistics.median(times[1])


def refine(ctx: Context) -> dict[str, Any]:
    s = ctx.proto["settings"]
    r = s["refine"]
    arm = ctx.args["arm"]
    x, y, vx, vy, tx, ty = data(ctx)
    model = SmallCNN()
    model.load_state_dict(torch.load(ctx.cache_path("base.pt"), weights_only=True))
    per_epoch = steps_per_epoch(len(y), r["batch_size"])
    total = r["epochs"] * per_epoch
    loss_fn = None
    info = ctx.deps[f"seed{ctx.seed}-base"]["info"]
    extra: dict[str, Any] = {}
    if arm.startswith("ggr-w"):
        decoder = ReferenceDecoder.for_layer(model.conv1)
        decoder.load_state_dict(torch.load(ctx.cache_path("decoder.pt"), weights_only=True))
        ggr = GenerativeGradientLoss(
            model.conv1.weight,
            decoder,
            weight=ctx.args["weight"],
            discrepancy=s["ggr"]["discrepancy"],
            every=s["ggr"]["every"],
        )
        loss_fn = _ggr_loss(ggr)
        extra["weight"] = ctx.args["weight"]
    elif arm == "ce-matched":
        ce, gg = info["ce_step_cpu_seconds"], info["ggr_step_cpu_seconds"]
        total = round(total * gg / ce + info["decoder_cpu_seconds"] / ce)
        extra["matched_steps"] = total
    opt = sgd(model.parameters(), r["lr"], momentum=r["momentum"], weight_decay=r["weight_decay"])
    done, epoch, cpu = 0, 0, 0.0
    while done < total:
        st = train_epoch(
            model,
            opt,
            x,
            y,
            batch_size=r["batch_size"],
            gen=generator(ctx.seed, 8, epoch),
            loss_fn=loss_fn,
            max_steps=total - done,
            before_step=lambda i, d=done: set_lr(opt, cosine(r["lr"], d + i, total)),
        )
        done += st.steps
        cpu += st.cpu_seconds
        epoch += 1
    metrics = _evaluate(model, vx, vy, tx, ty)
    metrics.update(extra, steps=total, refine_cpu_seconds=cpu)
    return {"arms": {f"{STUDY}/{arm}": metrics}}


def finish(proto: dict[str, Any], seeds: list[dict[str, Any]], infos: dict[str, Any]) -> None:
    """``ggr-val``: per seed, the GGR weight with the best validation accuracy (ties: smaller)."""
    weights = proto["settings"]["ggr"]["weights"]
    for rec in seeds:
        arms = rec["arms"]
        candidates = [
            (arms[f"{STUDY}/{_wname(w)}"]["val_acc"], -w, w)
            for w in weights
            if f"{STUDY}/{_wname(w)}" in arms
        ]
        if len(candidates) == len(weights):
            best = max(candidates)[2]
            arms[f"{STUDY}/ggr-val"] = {**arms[f"{STUDY}/{_wname(best)}"], "selected_weight": best}


def premise(
    proto: dict[str, Any], seeds: list[dict[str, Any]], infos: dict[str, Any]
) -> list[dict[str, Any]]:
    base, ce = f"{STUDY}/base", f"{STUDY}/ce"
    ek = "test_acc" if proto["stage"] == "confirm" else "val_acc"
    moves = [
        abs(rec["arms"][ce][ek] - rec["arms"][base][ek]) * 100
        for rec in seeds
        if ce in rec["arms"] and base in rec["arms"]
    ]
    recon = [i["decoder_loss"][-1] for k, i in infos.items() if k.endswith("-base")]
    ratios = [i["ggr_step_cost_ratio"] for k, i in infos.items() if k.endswith("-base")]
    chosen = [
        rec["arms"][f"{STUDY}/ggr-val"]["selected_weight"]
        for rec in seeds
        if f"{STUDY}/ggr-val" in rec["arms"]
    ]
    return [
        check(
            "converged base: absolute change of the reported accuracy by CE-only refinement, "
            "points "
            "(mean over seeds)",
            mean(moves),
            "<",
            0.3,
            f"largest seed {max(moves):.2f} points" if moves else "",
        ),
        check(
            "reference decoder fitted: reconstruction MSE in its last epoch, images of unit "
            "variance (mean over seeds)",
            mean(recon),
            "<=",
            0.05,
            f"GGR step / CE step CPU cost {mean(ratios):.2f}x (mean over seeds); weights "
            f"chosen on validation: {chosen}"
            if ratios
            else "",
        ),
    ]


def describe(proto: dict[str, Any]) -> list[str]:
    s = proto["settings"]
    b, r = s["base"], s["refine"]
    return [
        f"Protocol: {s['n_train']:,} training / {s['n_val']:,} validation images (disjoint, "
        f"drawn per seed from the training split), {s['n_test']:,} test images. Base: the small "
        f"CNN of `examples/ggr.py`, {b['epochs']} epochs of SGD (lr {b['lr']}, cosine to 0, "
        f"momentum {b['momentum']}, wd {b['weight_decay']}). Refinement: {r['epochs']} epochs "
        f"from the converged weights at lr {r['lr']} (cosine to 0); GGR with the cosine "
        f"discrepancy at weights {s['ggr']['weights']}, the reference from a "
        f"`ReferenceDecoder` fitted for {s['decoder']['epochs']} epochs; the weight is chosen "
        f"per seed on the validation split. The compute-matched CE run gets the GGR run's CPU "
        f"time in CE steps (cost ratio measured per seed, decoder fitting included).",
    ]


def notes(result: dict[str, Any]) -> list[str]:
    """The mechanism at every weight: conv1 filter variance, GGR - CE (generated from the JSON)."""
    from repro import stats

    out = []
    for w in result["protocol"]["settings"]["ggr"]["weights"]:
        arm, ce = f"{STUDY}/{_wname(w)}", f"{STUDY}/ce"
        diffs = [
            rec["arms"][arm]["conv1_filter_var"] - rec["arms"][ce]["conv1_filter_var"]
            for rec in result["seeds"]
            if arm in rec["arms"] and ce in rec["arms"]
        ]
        p = stats.summarize(diffs)
        if p["ci"] is None:
            continue
        lo, hi = p["ci"]
        word = "higher" if lo > 0 else "lower" if hi < 0 else "not resolved"
        out.append(f"* weight {w:g}: {p['mean']:+.3g} [{lo:+.3g}, {hi:+.3g}] ({word})")
    if not out:
        return []
    return [
        "Mechanism, at every weight (conv1 mean filter variance, GGR - CE, mean and 95 % "
        "interval over the seeds):",
        "",
        *out,
    ]


def extra_panels(result: dict[str, Any]) -> list:
    """Accuracy and conv1 filter variance against the GGR weight (GGR - CE, per seed)."""
    from repro import stats

    weights = result["protocol"]["settings"]["ggr"]["weights"]
    ek = "test_acc" if result["stage"] == "confirm" else "val_acc"

    def draw(ax) -> None:
        twin = ax.twinx()
        for axis, metric, scale, color, label in (
            (ax, ek, 100.0, "tab:blue", ek.replace("_acc", " accuracy") + " (points)"),
            (twin, "conv1_filter_var", 1.0, "tab:orange", "conv1 filter variance"),
        ):
            means, los, his = [], [], []
            for w in weights:
                arm, ce = f"{STUDY}/{_wname(w)}", f"{STUDY}/ce"
                diffs = [rec["arms"][arm][metric] - rec["arms"][ce][metric] for rec in
                         result["seeds"] if arm in rec["arms"] and ce in rec["arms"]]  # fmt: skip
                p = stats.summarize(diffs)
                m = (p["mean"] or 0.0) * scale
                lo, hi = p["ci"] or [p["mean"] or 0.0] * 2
                means.append(m)
                los.append(m - lo * scale)
                his.append(hi * scale - m)
            axis.errorbar(weights, means, yerr=[los, his], marker="o", color=color, capsize=3,
                          label=label)  # fmt: skip
            axis.set_ylabel(f"GGR - CE: {label}", color=color, fontsize=8)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("GGR weight")
        ax.set_title("GGR - CE against the weight (mean, 95 % interval)", fontsize=9)

    return [draw]
