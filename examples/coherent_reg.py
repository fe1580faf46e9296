"""Gradient-coherent strong L1 against always-on and delayed strong L1, at one strength.

A 5-hidden-layer MLP (784-256x5-10) trained with SGD (lr 0.05, momentum 0.9, cosine) on a
Fashion-MNIST subset (or the MNIST-5k digits when Fashion-MNIST is not installed), four ways,
at the same strong proximal-L1 strength (default 0.03, strong enough to collapse this MLP):

* baseline: no regulariser;
* always-on strong L1 (``criterion="always"``): expected to collapse;
* delayed strong L1 (``criterion="always", delay=`` one epoch): the authors' earlier method;
* coherent L1: :class:`torch_recal.CoherentStrongReg` with its defaults.

It prints test accuracy, the compression ratio (dense / non-zero weights, exact zeros) and
the fraction of steps the regulariser was on, and saves a plot. For the full strength sweep
on two models with paired seeds, see ``python examples/reproduce.py coherent``.

    PYTHONPATH=. python examples/coherent_reg.py --no-progress --out outputs
"""

from __future__ import annotations

import torch
from _common import Timer, accuracy, get_data, mean_std, parser, plt, print_table, save_figure
from _common import train_epoch as _train_epoch
from torch import nn

from torch_recal import CoherentStrongReg, compression_report

VARIANTS = ("baseline", "always-on strong L1", "delayed strong L1", "coherent L1 (defaults)")


def make_model() -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(5):
        layers += [nn.Linear(width, 256), nn.ReLU()]
        width = 256
    return nn.Sequential(*layers, nn.Linear(width, 10))


def run(variant: str, data, args, seed: int) -> dict:
    torch.manual_seed(seed)
    model = make_model().to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps_per_epoch = (len(data.train_y) + args.batch_size - 1) // args.batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.epochs * steps_per_epoch)
    kw: dict = {"strength": args.strength, "optimizer": opt}
    if variant == "always-on strong L1":
        kw.update(criterion="always", warmup=0)
    elif variant == "delayed strong L1":
        kw.update(criterion="always", warmup=0, delay=steps_per_epoch)
    reg = None if variant == "baseline" else CoherentStrongReg(model.named_parameters(), **kw)
    handle = reg.attach() if reg is not None else None
    curve = []
    for epoch in range(args.epochs):
        _train_epoch(
            model, data, opt, device=args.device, batch_size=args.batch_size,
            seed=seed * 1000 + epoch, progress=not args.no_progress, desc=variant,
            after_step=sched.step,
        )  # fmt: skip
        curve.append(accuracy(model, data.test_x, data.test_y, device=args.device))
    if handle is not None:
        handle.remove()
    on = sum(h["active"] for h in reg.history) / len(reg.history) if reg else 0.0
    ratio = compression_report(model).compression_ratio
    return {"acc": curve[-1], "curve": curve, "ratio": ratio, "on": on}


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=15)
    p.add_argument("--strength", type=float, default=0.03, help="L1 strength for every variant")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--batch-size", type=int, default=128)
    args = p.parse_args()
    if args.smoke:
        args.epochs, args.seeds = 2, 1
    data = get_data(args, n_train=10_000, n_test=2_000)
    print(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test images, "
          f"L1 strength {args.strength}, {args.epochs} epochs, {args.seeds} seed(s)")  # fmt: skip
    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    with Timer() as timer:
        for seed in range(args.seeds):
            for v in VARIANTS:
                results[v].append(run(v, data, args, seed))
    rows = []
    for v in VARIANTS:
        rs = results[v]
        finite = all(r["ratio"] < float("inf") for r in rs)
        ratio = mean_std([r["ratio"] for r in rs]) if finite else "inf (all weights zero)"
        rows.append([v, mean_std([r["acc"] for r in rs]), ratio, mean_std([r["on"] for r in rs])])
    print_table(["variant", "test accuracy", "compression (dense/non-zero)", "reg on (frac)"], rows)
    print(f"({timer.seconds:.0f} s)")

    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(10, 4))
    for v in VARIANTS:
        ax1.plot(range(1, args.epochs + 1), results[v][0]["curve"], marker="o", label=v)
        ax2.bar(v, min(results[v][0]["ratio"], 1e3), label=v)
    ax1.set(xlabel="epoch", ylabel="test accuracy", title=f"L1 strength {args.strength}")
    ax1.legend(fontsize=7)
    ax2.set(ylabel="compression ratio (dense / non-zero)", yscale="log", title="seed 0")
    ax2.tick_params(axis="x", labelrotation=30, labelsize=7)
    save_figure(args, fig, "coherent_reg.png")


if __name__ == "__main__":
    main()
