"""Fast retraining: an exact refit of the head after decayed-lr SGD, and the paper's pipeline.

Narrow ResNet-20 (widths 8/16/32) on a Fashion-MNIST subset, paired seeds.

``final`` study (all seeds): SGD with a cosine lr decayed to 0 (the strong baseline), then

* ``sgd``: its own head;
* ``sgd+refit``: the head replaced by ``pinv_refit_dense`` (exact ridge solution on the
  pooled features of the training images), the ridge chosen on a validation split carved
  from the training data;
* ``sgd+refit-if-better``: the refit kept only when it beats the SGD head on the validation
  split (what a careful user would do).

``time`` study (the first seeds): the paper's pipeline against plain SGD, trained in the same
process with their epochs interleaved (plain epoch, pipeline epoch, ...), timed as CPU time
(``time.process_time``, one thread) so that the other jobs on the machine count less:

* ``plain``: the same SGD run as ``sgd`` above (it is that run);
* ``pipeline``: ``RandomLayerTraining`` over the stem and the 9 residual blocks with the
  default rule (each epoch a random number of the *last* layers is trained, so backward stops
  early), the same SGD, and after every epoch the paper's MP refinement of the head
  (``start="current"``, ``step_size=0.5``; ridge chosen on the validation split each epoch;
  the feature passes and solves count in its time).

Premise: the baseline has converged (its validation accuracy gained < 0.5 points over its last
two epochs) and the random layer training really shortens the backward pass (its measured
backward CPU time per epoch is < 0.9x plain SGD's).
"""

from __future__ import annotations

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
    sgd,
    steps_per_epoch,
    train_epoch,
)
from torch_recal import RandomLayerTraining, pinv_refit_dense
from torch_recal.models import resnet20

CARD = "refit.md"
HEADLINE = (
    ("final", "refit - SGD"),
    ("final", "refit if better - SGD"),
    ("time", "pipeline - plain: CPU time to target"),
)  # (study, pair label) shown in the README
RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def protocol(quick: bool, seeds: list[int] | None) -> dict[str, Any]:
    seeds = seeds if seeds is not None else list(range(2 if quick else 5))
    n_time = min(len(seeds), 2 if quick else 3)
    ek = eval_key()
    settings = {
        "data": "Fashion-MNIST: train and validation subsets drawn per seed (disjoint) from the "
        "60,000 training images; test subset from the 10,000 test images",
        "n_train": 256 if quick else 6_000,
        "n_val": 256 if quick else 2_000,
        "n_test": 256 if quick else 5_000,
        "model": "torch_recal.models.resnet20(widths=(8, 16, 32), in_chans=1, num_classes=10)",
        "epochs": 2 if quick else 12,
        "n_curve": 128 if quick else 2_000,
        "batch_size": 128,
        "lr": 0.05,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "lr_schedule": "cosine per step to 0 (both arms of both studies)",
        "ridge_grid": list(RIDGES),
        "refit": "pinv_refit_dense(model.fc, features of the training images, ridge=r) with "
        "targets='onehot'; features = model.forward_features in eval mode",
        "pipeline": {
            "layers": "stem (conv1 + bn1) and the 9 residual blocks, first to last",
            "rule": "RandomLayerTraining(layers, seed=seed) (schedule=None, min_trainable=1): a "
            "uniformly random number of the last layers trained each epoch",
            "refinement": "after every epoch pinv_refit_dense(model.fc, ..., start='current', "
            "step_size=0.5), ridge chosen on the validation split",
        },
        "time_to_accuracy": "CPU seconds until the accuracy curve (measured after every epoch "
        "on the first n_curve test images, linear in between) first reaches the lower of the "
        "two arms' final values on it minus 0.5 points",
        "how_chosen": "the ridge on the validation split; lr and sizes fixed in advance and "
        "sized to the time budget (10 min on 2 cores); epochs raised from 8 to 12 after a "
        "two-seed sizing run showed the 8-epoch baseline still improving (the premise)",
    }
    return {
        "settings": settings,
        "studies": {
            "final": {
                "title": "decayed-lr SGD vs + exact refit of the head",
                "seeds": list(seeds),
                "arms": ["final/sgd", "final/sgd+refit", "final/sgd+refit-if-better"],
                "labels": {
                    "final/sgd": "SGD, cosine lr to 0",
                    "final/sgd+refit": "+ refit of the head (ridge chosen on val)",
                    "final/sgd+refit-if-better": "+ refit, kept only if better on val",
                },
                "columns": [
                    [ek, ek.replace("_acc", " accuracy"), "accuracy"],
                    ["val_acc", "validation accuracy", "accuracy"],
                ],
                "pairs": [
                    {
                        "label": "refit - SGD",
                        "a": "final/sgd",
                        "b": "final/sgd+refit",
                        "metric": ek,
                        "unit": "accuracy",
                        "expected": "+",
                    },
                    {
                        "label": "refit if better - SGD",
                        "a": "final/sgd",
                        "b": "final/sgd+refit-if-better",
                        "metric": ek,
                        "unit": "accuracy",
                        "expected": "+",
                    },
                ],
            },
            "time": {
                "title": "pipeline (random layers + per-epoch refit) vs plain SGD, CPU time",
                "seeds": list(seeds[:n_time]),
                "arms": ["time/plain", "time/pipeline"],
                "labels": {
                    "time/plain": "plain SGD",
                    "time/pipeline": "pipeline: RandomLayerTraining + MP refit",
                },
                "columns": [
                    [ek, "final " + ek.replace("_acc", " accuracy"), "accuracy"],
                    ["cpu_seconds", "training CPU s", "s"],
                    ["backward_cpu_seconds", "backward CPU s", "s"],
                    ["time_to_target", "CPU s to target accuracy", "s"],
                ],
                "pairs": [
                    {
                        "label": "pipeline - plain: test accuracy",
                        "a": "time/plain",
                        "b": "time/pipeline",
                        "metric": ek,
                        "unit": "accuracy",
                        "expected": "+",
                    },
                    {
                        "label": "pipeline - plain: training CPU time",
                        "a": "time/plain",
                        "b": "time/pipeline",
                        "metric": "cpu_seconds",
                        "unit": "s",
                        "expected": "-",
                    },
                    {
                        "label": "pipeline - plain: CPU time to target",
                        "a": "time/plain",
                        "b": "time/pipeline",
                        "metric": "time_to_target",
                        "unit": "s",
                        "expected": "-",
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


def data(ctx: Context) -> tuple[torch.Tensor, ...]:
    s = ctx.proto["settings"]
    return fashion_subsets(ctx.data_dir, ctx.seed, s["n_train"], s["n_val"], s["n_test"])


class Arm:
    """A model, its optimizer and its per-step cosine lr."""

    def __init__(self, ctx: Context, n: int) -> None:
        s = ctx.proto["settings"]
        seed_torch(ctx.seed, 0)  # the same initialisation for both arms
        self.model = resnet20(widths=(8, 16, 32), in_chans=1, num_classes=10)
        self.opt = sgd(
            self.model.parameters(), s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"]
        )
        self.per_epoch = steps_per_epoch(n, s["batch_size"])
        self.total = s["epochs"] * self.per_epoch
        self.s, self.seed = s, ctx.seed
        self.cpu, self.backward = 0.0, 0.0
        self.curve: list[dict[str, float]] = []

    def epoch(self, e: int, x, y) -> float:
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
        self.backward += st.backward_cpu_seconds
        return st.backward_cpu_seconds


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model.forward_features(x[i : i + 500]) for i in range(0, len(x), 500)])
    model.train(was)
    return out


def _head_acc(weight: torch.Tensor, bias: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> float:
    return float(((h @ weight.T + bias).argmax(1) == y).float().mean())


def refit_head(
    fc: nn.Linear, h, y, hv, vy, *, start: str = "zero", step_size: float = 1.0
) -> dict[str, Any]:
    """Refit ``fc`` on features ``h`` for every ridge of the grid; keep the best on validation.

    Returns the chosen ridge and the validation accuracy of every candidate. ``fc`` gets the
    chosen weights.
    """
    loader = [(h[i : i + 1024], y[i : i + 1024]) for i in range(0, len(y), 1024)]
    best = None
    scores = {}
    for ridge in RIDGES:
        res = pinv_refit_dense(
            fc, loader, ridge=ridge, start=start, step_size=step_size, evaluate=False, assign=False
        )
        acc = _head_acc(res.weight, res.bias, hv, vy)
        scores[f"{ridge:g}"] = acc
        if best is None or acc > best[0]:
            best = (acc, ridge, res.weight, res.bias)
    assert best is not None
    with torch.no_grad():
        fc.weight.copy_(best[2])
        fc.bias.copy_(best[3])
    return {"ridge": best[1], "val_acc": best[0], "val_by_ridge": scores}


def run(ctx: Context) -> dict[str, Any]:
    s = ctx.proto["settings"]
    x, y, vx, vy, tx, ty = data(ctx)
    cx, cy = tx[: s["n_curve"]], ty[: s["n_curve"]]  # the time-to-accuracy curves
    plain = Arm(ctx, len(y))
    pipe = Arm(ctx, len(y)) if ctx.args["timed"] else None
    rlt = None
    if pipe is not None:
        m = pipe.model
        layers = [nn.ModuleList([m.conv1, m.bn1]), *m.layer1, *m.layer2, *m.layer3]
        rlt = RandomLayerTraining(layers, seed=ctx.seed)
    plain_val, trainable, refits = [], [], []
    bw_plain, bw_pipe = [], []
    for e in range(s["epochs"]):
        bw_plain.append(plain.epoch(e, x, y))
        plain_val.append(accuracy(plain.model, vx, vy))
        if pipe is None or rlt is None:
            continue
        plain.curve.append({"cpu": plain.cpu, "acc": accuracy(plain.model, cx, cy)})
        trainable.append(sum(rlt.trainable))
        bw_pipe.append(pipe.epoch(e, x, y))
        t0 = time.process_time()  # the per-epoch refinement counts in the pipeline's time
        h, hv = features(pipe.model, x), features(pipe.model, vx)
        refits.append(refit_head(pipe.model.fc, h, y, hv, vy, start="current", step_size=0.5))
        pipe.cpu += time.process_time() - t0
        pipe.curve.append({"cpu": pipe.cpu, "acc": accuracy(pipe.model, cx, cy)})
        if e + 1 < s["epochs"]:
            rlt.step()
    if rlt is not None:
        rlt.restore()

    sgd_test, sgd_val = accuracy(plain.model, tx, ty), plain_val[-1]
    fc = plain.model.fc
    sgd_head = (fc.weight.detach().clone(), fc.bias.detach().clone())
    t0 = time.process_time()
    h, hv, ht = features(plain.model, x), features(plain.model, vx), features(plain.model, tx)
    chosen = refit_head(fc, h, y, hv, vy)
    refit_cpu = time.process_time() - t0
    refit_test = _head_acc(fc.weight, fc.bias, ht, ty)
    keep = chosen["val_acc"] > sgd_val
    arms: dict[str, Any] = {
        "final/sgd": {
            "val_acc": sgd_val,
            eval_key(): sgd_test,
            "val_curve": plain_val,
            "train_cpu_seconds": plain.cpu,
        },
        "final/sgd+refit": {
            "val_acc": chosen["val_acc"],
            eval_key(): refit_test,
            "ridge": chosen["ridge"],
            "val_by_ridge": chosen["val_by_ridge"],
            "refit_cpu_seconds": refit_cpu,
        },
        "final/sgd+refit-if-better": {
            "val_acc": max(chosen["val_acc"], sgd_val),
            eval_key(): refit_test if keep else sgd_test,
            "kept": keep,
        },
    }
    with torch.no_grad():
        fc.weight.copy_(sgd_head[0])
        fc.bias.copy_(sgd_head[1])
    arms["final/sgd"]["train_acc"] = accuracy(plain.model, x, y)
    if pipe is not None:
        target = min(plain.curve[-1]["acc"], pipe.curve[-1]["acc"]) - 0.005
        for name, arm, bw in (("time/plain", plain, bw_plain), ("time/pipeline", pipe, bw_pipe)):
            arms[name] = {
                eval_key(): sgd_test if arm is plain else accuracy(pipe.model, tx, ty),
                "cpu_seconds": arm.cpu,
                "backward_cpu_seconds": sum(bw),
                "backward_per_epoch": bw,
                "time_to_target": time_to(arm.curve, target),
                "target": target,
                "curve": arm.curve,
            }
        arms["time/pipeline"]["trainable_layers"] = trainable
        arms["time/pipeline"]["ridges"] = [r["ridge"] for r in refits]
    return {"arms": arms}


def time_to(curve: list[dict[str, float]], target: float) -> float | None:
    """CPU seconds at which the accuracy curve (linear between points, from (0, 0)) hits target."""
    prev_t, prev_a = 0.0, 0.0
    for p in curve:
        if p["acc"] >= target:
            frac = (target - prev_a) / max(p["acc"] - prev_a, 1e-12)
            return prev_t + frac * (p["cpu"] - prev_t)
        prev_t, prev_a = p["cpu"], p["acc"]
    return None


def premise(
    proto: dict[str, Any], seeds: list[dict[str, Any]], infos: dict[str, Any]
) -> list[dict[str, Any]]:
    gains = []  # validation accuracy gained over the last two epochs (one if only two)
    for rec in seeds:
        curve = rec["arms"].get("final/sgd", {}).get("val_curve", [])
        if len(curve) >= 2:
            gains.append((curve[-1] - curve[-min(3, len(curve))]) * 100)
    ratios, fractions = [], []
    for rec in seeds:
        a = rec["arms"]
        if "time/pipeline" in a and "time/plain" in a:
            ratios.append(
                a["time/pipeline"]["backward_cpu_seconds"] / a["time/plain"]["backward_cpu_seconds"]
            )
            fractions.append(mean(a["time/pipeline"]["trainable_layers"]) / 10)
    return [
        check(
            "SGD baseline converged: validation accuracy gain over its last 2 epochs, points "
            "(mean over seeds)",
            mean(gains) if gains else None,
            "<",
            0.5,
            f"largest seed {max(gains):+.2f}" if gains else "",
        ),
        check(
            "random layer training shortens backward: backward CPU time, pipeline / plain "
            "(mean over timed seeds)",
            mean(ratios),
            "<",
            0.9,
            f"mean fraction of layers trained {mean(fractions):.2f}" if fractions else "",
        ),
    ]


def describe(proto: dict[str, Any]) -> list[str]:
    s = proto["settings"]
    return [
        f"Protocol: narrow ResNet-20 (8/16/32), {s['n_train']:,} training / {s['n_val']:,} "
        f"validation images (disjoint, drawn per seed), {s['n_test']:,} test images; "
        f"{s['epochs']} epochs of SGD (lr {s['lr']}, cosine per step to 0, momentum "
        f"{s['momentum']}, wd {s['weight_decay']}, batch {s['batch_size']}). Refit: "
        f"`pinv_refit_dense` on the pooled features, ridge chosen on the validation split from "
        f"{s['ridge_grid']}. Pipeline: `RandomLayerTraining` over the stem and the 9 blocks "
        f"(a random number of the last layers trained each epoch), then the MP refinement "
        f'(`start="current", step_size=0.5`) after every epoch; the two arms\' epochs are '
        f"interleaved in one process and timed as CPU time; evaluation is not timed.",
    ]


def extra_panels(result: dict[str, Any]) -> list:
    def draw(ax) -> None:
        for arm, color in (("time/plain", "tab:blue"), ("time/pipeline", "tab:orange")):
            first = True
            for rec in result["seeds"]:
                c = rec["arms"].get(arm, {}).get("curve")
                if not c:
                    continue
                ax.plot(
                    [p["cpu"] for p in c],
                    [p["acc"] for p in c],
                    marker="o",
                    markersize=3,
                    color=color,
                    alpha=0.7,
                    label=arm.split("/")[1] if first else None,
                )
                first = False
        ax.set_xlabel("training CPU seconds (one thread)")
        ax.set_ylabel("accuracy on the curve test images")
        ax.set_title("time to accuracy, one line per seed", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)

    return [draw]


def notes(result: dict[str, Any]) -> list[str]:
    """The refit's choices on the validation split (generated from the JSON)."""
    kept = [rec["arms"].get("final/sgd+refit-if-better", {}).get("kept") for rec in result["seeds"]]
    ridges = [rec["arms"].get("final/sgd+refit", {}).get("ridge") for rec in result["seeds"]]
    kept, ridges = [k for k in kept if k is not None], [r for r in ridges if r is not None]
    out = []
    if kept:
        out.append(
            f"The refit beat the SGD head on the validation split in {sum(kept)} of {len(kept)} "
            f"seeds (ridges chosen: {', '.join(f'{r:g}' for r in ridges)})."
        )
    timed = [rec["arms"] for rec in result["seeds"] if "time/pipeline" in rec["arms"]]
    if timed:

        def other(arm: dict[str, Any]) -> float:  # training time outside backward
            return arm["cpu_seconds"] - arm["backward_cpu_seconds"]

        saved = mean([a["time/plain"]["backward_cpu_seconds"]
                      - a["time/pipeline"]["backward_cpu_seconds"] for a in timed])  # fmt: skip
        rest = mean([other(a["time/pipeline"]) - other(a["time/plain"]) for a in timed])
        out += ["", f"Where the pipeline's time goes (mean over the timed seeds): its backward "
                f"passes took {saved:.1f} CPU s less than plain SGD's, and everything else "
                f"(the per-epoch refinement: feature passes over the training and validation "
                f"images and the solves) {rest:+.1f} CPU s."]  # fmt: skip
    return out
