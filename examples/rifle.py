"""Fine-tuning with and without RIFLE (re-initialising the head), real Fashion-MNIST, seeds.

    python examples/rifle.py                       # 3 seeds, ~5-10 minutes on 2 busy CPU cores
    python examples/rifle.py --cyclic --n-target 1000 --epochs 40 --seeds 5
    python examples/rifle.py --schedule-only --out docs/img   # only the schedule plot
    python examples/rifle.py --smoke

Transfer learning in miniature: a small CIFAR-style ResNet is pretrained on the Fashion-MNIST
classes 5-9 (sandal, shirt, sneaker, bag, ankle boot), then fine-tuned with a new 5-way head
on a small labelled subset of the other classes 0-4 (T-shirt, trouser, pullover, dress, coat).
The recipe follows the official RIFLE code: SGD (momentum 0.9, weight decay 1e-4), the head
in its own param group, a cosine lr over all epochs. Variants: plain fine-tuning; RIFLE
(``RifleScheduler(model, num_resets=1)``, the official default); with ``--cyclic`` also RIFLE
with the cyclic head lr (``head_lr_factor``). Prints a table (mean ± std over seeds) and writes
``outputs/rifle.png`` (test accuracy per epoch) and ``outputs/rifle_schedule.png``.
"""

from __future__ import annotations

import copy
import math

import torch
from _common import (
    Timer,
    accuracy,
    get_data,
    mean_std,
    out_path,
    parser,
    plt,
    print_table,
    save_figure,
    train_epoch,
)
from data import Data
from torch import nn

from torch_recal import RifleScheduler
from torch_recal.models import CifarResNet

SOURCE, TARGET = (5, 6, 7, 8, 9), (0, 1, 2, 3, 4)


def pick(x: torch.Tensor, y: torch.Tensor, classes: tuple[int, ...], n: int, seed: int):
    """``n`` random samples of ``classes``, labels renumbered 0..len(classes)-1."""
    idx = torch.nonzero(torch.isin(y, torch.tensor(classes))).flatten()
    idx = idx[torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))][:n]
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    return x[idx], remap[y[idx]]


def make_model(args) -> CifarResNet:
    return CifarResNet(args.depth, num_classes=len(SOURCE), in_chans=1, widths=(8, 16, 32))


def pretrain(args, data: Data) -> CifarResNet:
    torch.manual_seed(1234)
    model = make_model(args).to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = args.pretrain_epochs * math.ceil(len(data.train_y) / 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    for epoch in range(args.pretrain_epochs):
        train_epoch(model, data, opt, device=args.device, seed=epoch, after_step=sched.step,
                    progress=not args.no_progress, desc=f"pretrain {epoch + 1}")  # fmt: skip
    acc = accuracy(model, data.test_x, data.test_y, device=args.device)
    print(f"pretrained on classes {SOURCE}: {len(data.train_y)} images, "
          f"{args.pretrain_epochs} epochs, source test accuracy {acc:.4f}", flush=True)  # fmt: skip
    return model


def finetune(args, source_model: CifarResNet, data: Data, *, seed: int, variant: str) -> dict:
    """The official recipe: head in its own group, cosine lr, SGD momentum 0.9, wd 1e-4."""
    model = copy.deepcopy(source_model)
    torch.manual_seed(seed)  # same new head for every variant of a seed
    model.fc = nn.Linear(model.fc.in_features, len(TARGET)).to(args.device)
    head = list(model.fc.parameters())
    backbone = [p for n, p in model.named_parameters() if not n.startswith("fc.")]
    opt = torch.optim.SGD([{"params": head}, {"params": backbone}], lr=args.lr, momentum=0.9,
                          weight_decay=1e-4)  # fmt: skip
    rifle = None
    if variant != "fine-tune":
        rifle = RifleScheduler(model, total_epochs=args.epochs, num_resets=args.num_resets,
                               seed=seed)  # fmt: skip
    curve, seconds = [], 0.0
    for epoch in range(args.epochs):
        lr_backbone = 0.5 * args.lr * (1 + math.cos(math.pi * epoch / args.epochs))
        lr_head = lr_backbone
        if rifle is not None and variant.endswith("cyclic head lr"):
            lr_head = args.lr * rifle.head_lr_factor(epoch)
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_head, lr_backbone
        with Timer() as t:
            train_epoch(model, data, opt, device=args.device, batch_size=32,
                        seed=seed * 1000 + epoch, progress=not args.no_progress,
                        desc=f"{variant} seed {seed} epoch {epoch + 1}")  # fmt: skip
        seconds += t.seconds
        curve.append(accuracy(model, data.test_x, data.test_y, device=args.device))
        if rifle is not None:
            rifle.step()  # after the epoch and its evaluation: re-initialises model.fc if due
    return {"acc": curve[-1], "curve": curve, "seconds": seconds}


def plot_schedule(args, path) -> None:
    total = args.epochs
    rifle = RifleScheduler(nn.Linear(1, 1), total_epochs=total, num_resets=args.num_resets)
    epochs = list(range(total))
    backbone = [0.5 * (1 + math.cos(math.pi * e / total)) for e in epochs]
    head = [rifle.head_lr_factor(e) for e in epochs]
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 2.8))
    x = [*epochs, total]  # one step per epoch, the last one drawn to the end of the run
    ax.step(x, [*backbone, backbone[-1]], where="post", label="backbone lr (cosine)")
    ax.step(x, [*head, head[-1]], where="post", linestyle="--", label="head lr, cyclic option")
    for i, e in enumerate(rifle.schedule()):
        ax.axvline(
            e + 1, color="tab:red", linewidth=2, label="head re-initialised" if i == 0 else None
        )
    ax.set_xlim(0, total)
    ax.set_xlabel("epoch (a reset after epoch e is drawn at e + 1)")
    ax.set_ylabel("lr / base lr")
    ax.set_title(f"RIFLE: {total} epochs, num_resets={args.num_resets} -> after {rifle.schedule()}")
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot.close(fig)
    print(f"schedule plot written to {path}")


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=16, seeds=3)
    p.add_argument("--num-resets", type=int, default=1, help="RIFLE re-initialisations")
    p.add_argument("--n-source", type=int, default=4000, help="pretraining images (classes 5-9)")
    p.add_argument("--n-target", type=int, default=300, help="labelled fine-tuning images")
    p.add_argument("--n-test", type=int, default=500, help="test images of classes 0-4")
    p.add_argument("--pretrain-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01, help="base lr (official lr_init)")
    p.add_argument("--depth", type=int, default=14, help="ResNet depth 6n + 2")
    p.add_argument("--cyclic", action="store_true", help="add RIFLE + cyclic head lr")
    p.add_argument("--schedule-only", action="store_true", help="only write the schedule plot")
    args = p.parse_args()
    if args.schedule_only:
        plot_schedule(args, out_path(args, "rifle_schedule.png"))
        return
    if args.smoke:
        args.epochs, args.seeds, args.pretrain_epochs, args.depth = 2, 1, 1, 8
        args.n_source, args.n_target, args.n_test = 64, 32, 64
    full = get_data(args, n_train=None, n_test=None)
    src_x, src_y = pick(full.train_x, full.train_y, SOURCE, args.n_source, seed=0)
    src_tx, src_ty = pick(full.test_x, full.test_y, SOURCE, args.n_test, seed=0)
    test_x, test_y = pick(full.test_x, full.test_y, TARGET, args.n_test, seed=0)
    source_model = pretrain(args, Data(full.name, src_x, src_y, src_tx, src_ty, len(SOURCE)))

    variants = ["fine-tune", f"RIFLE (num_resets={args.num_resets})"]
    if args.cyclic or args.smoke:
        variants.append(f"RIFLE (num_resets={args.num_resets}) + cyclic head lr")
    results: dict[str, list[dict]] = {v: [] for v in variants}
    for seed in range(args.seeds):
        x, y = pick(full.train_x, full.train_y, TARGET, args.n_target, seed=100 + seed)
        data = Data(full.name, x, y, test_x, test_y, len(TARGET))
        for variant in variants:
            run = finetune(args, source_model, data, seed=seed, variant=variant)
            results[variant].append(run)
            print(f"  seed {seed} {variant}: test accuracy {run['acc']:.4f}", flush=True)
    print(f"\nfine-tuned on {args.n_target} images of classes {TARGET}, {args.epochs} epochs, "
          f"tested on {len(test_y)}, {args.seeds} seeds")  # fmt: skip
    base = results["fine-tune"]
    rows = []
    for variant, runs in results.items():
        gains = [r["acc"] - b["acc"] for r, b in zip(runs, base, strict=True)]
        rows.append([variant, mean_std([r["acc"] for r in runs]), mean_std(gains),
                     f"{sum(r['seconds'] for r in runs) / len(runs):.0f}"])  # fmt: skip
    print_table(["variant", "test accuracy", "gain vs fine-tune (paired)", "train s/run"], rows)

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 3.4))
    for variant, runs in results.items():
        curves = torch.tensor([r["curve"] for r in runs])
        ax.plot(range(1, args.epochs + 1), curves.mean(0), marker="o", label=variant)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (classes 0-4)")
    ax.set_title(f"fine-tuning on {args.n_target} images, {args.seeds} seeds")
    ax.legend(fontsize=8)
    save_figure(args, fig, "rifle.png")
    plot_schedule(args, out_path(args, "rifle_schedule.png"))


if __name__ == "__main__":
    main()
