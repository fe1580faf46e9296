"""Gradient-coherent strong L1 regularisation vs plain and delayed strong L1.

An MLP (784-256-10) trained with SGD (lr 0.1, momentum 0.9) on a Fashion-MNIST subset (or
the MNIST-5k digits when Fashion-MNIST is not installed), five ways, at the same strong L1
strength (default 0.03):

* baseline: no regulariser;
* plain strong L1: the L1 subgradient on every step (expected to collapse);
* delayed strong L1: no regulariser for the first epoch, then on every step (the authors'
  earlier "Delayed Strong Regularization");
* coherent L1: :class:`torch_recal.CoherentStrongReg` with its default gate (subgradient);
* plain strong L1 (prox) and coherent L1 (prox): the same two with the proximal
  soft-threshold form of L1 instead of the subgradient.

It prints test accuracy and the compression ratio (dense / non-zero weights, exact zeros)
and saves a plot. Default run: a few minutes on 2 CPU cores; ``--smoke``: seconds.

    PYTHONPATH=. python examples/coherent_reg.py --no-progress --out outputs
"""

from __future__ import annotations

import torch
from _common import (
    Timer,
    accuracy,
    get_data,
    mean_std,
    parser,
    plt,
    print_table,
    save_figure,
    train_epoch,
)
from torch import nn

from torch_recal import CoherentStrongReg, compression_report

VARIANTS = (
    "baseline",
    "plain strong L1",
    "delayed strong L1",
    "coherent L1",
    "plain strong L1 (prox)",
    "coherent L1 (prox)",
)


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def run(variant: str, data, args, seed: int) -> dict:
    torch.manual_seed(seed)
    model = make_model().to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    steps_per_epoch = (len(data.train_y) + args.batch_size - 1) // args.batch_size
    kw: dict = {"kind": "l1", "strength": args.strength, "max_ratio": args.max_ratio}
    if variant == "plain strong L1":
        kw["gate"] = False
    elif variant == "delayed strong L1":
        kw.update(gate=False, delay=steps_per_epoch)
    elif variant == "plain strong L1 (prox)":
        kw.update(gate=False, l1_mode="prox", optimizer=opt)
    elif variant == "coherent L1 (prox)":
        kw.update(l1_mode="prox", optimizer=opt)
    reg = None if variant == "baseline" else CoherentStrongReg(model.named_parameters(), **kw)
    curve = []
    for epoch in range(args.epochs):
        train_epoch(
            model, data, opt, device=args.device, batch_size=args.batch_size,
            seed=seed * 1000 + epoch, progress=not args.no_progress, desc=variant,
            after_backward=reg.step if reg else None,
            after_step=reg.after_step if reg else None,
        )  # fmt: skip
        curve.append(accuracy(model, data.test_x, data.test_y, device=args.device))
    on = sum(h["active"] for h in reg.history) / len(reg.history) if reg else 0.0
    return {"acc": curve[-1], "curve": curve, "ratio": compression_report(model).compression_ratio,
            "on": on}  # fmt: skip


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=8)
    p.add_argument("--strength", type=float, default=0.03, help="L1 strength for every variant")
    p.add_argument("--max-ratio", type=float, default=4.0, help="the gate's |r|/|g| limit")
    p.add_argument("--lr", type=float, default=0.1)
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
        rows.append([
            v, mean_std([r["acc"] for r in rs]),
            mean_std([r["ratio"] for r in rs]) if all(r["ratio"] < float("inf") for r in rs)
            else "inf (all weights zero)",
            mean_std([r["on"] for r in rs]),
        ])  # fmt: skip
    print_table(["variant", "test accuracy", "compression (dense/non-zero)", "reg on (frac)"], rows)
    print(f"({timer.seconds:.0f} s)")

    pyplot = plt()
    fig, (ax1, ax2) = pyplot.subplots(1, 2, figsize=(10, 4))
    for v in VARIANTS:
        ax1.plot(range(1, args.epochs + 1), results[v][0]["curve"], marker="o", label=v)
        ratio = results[v][0]["ratio"]
        ax2.bar(v, min(ratio, 1e3), label=v)
    ax1.set(xlabel="epoch", ylabel="test accuracy", title=f"L1 strength {args.strength}")
    ax1.legend(fontsize=7)
    ax2.set(ylabel="compression ratio (dense / non-zero)", yscale="log", title="seed 0")
    ax2.tick_params(axis="x", labelrotation=30, labelsize=7)
    save_figure(args, fig, "coherent_reg.png")


if __name__ == "__main__":
    main()
