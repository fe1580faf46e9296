"""Fast retraining on Fashion-MNIST: closed-form refit of the classifier, random layer training.

Wu, Zhang, Yang, "Deep Networks with Fast Retraining", https://arxiv.org/abs/2008.07387.

A small CNN (three conv blocks, global average pooling, a 128 -> 10 linear classifier) is
trained with SGD on a subset of Fashion-MNIST (default 6,000 training / 2,000 test images, to
keep the run to a few minutes on 2 CPU cores). Then, per seed:

* ``sgd``: the trained network (E epochs of SGD);
* ``sgd + refit``: its classifier replaced by ``pinv_refit_dense`` (one inference pass over
  the training set + a 128 x 128 solve);
* ``sgd + same-time SGD``: instead of the refit, SGD continues for the same wall time the
  refit took (the honest baseline for "is the refit worth its time?");
* ``fast retraining``: E epochs of the paper's pipeline from scratch: each epoch a random
  subset of conv blocks is frozen (``RandomLayerTraining`` with the paper's ``r_a``
  schedule, compressed to E epochs), one SGD epoch, then an MP refinement of the classifier
  (``start="current"``, ``step_size=0.5``, as in the authors' scripts).

Usage::

    PYTHONPATH=. python examples/refit.py                       # a few minutes
    PYTHONPATH=. python examples/refit.py --smoke --no-progress --out /tmp/x
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from _common import (
    Timer,
    accuracy,
    batches,
    get_data,
    mean_std,
    parser,
    plt,
    print_table,
    save_figure,
    train_epoch,
)

from torch_recal import RandomLayerTraining, pinv_refit_dense


def small_cnn(width: int = 32) -> nn.Sequential:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU())  # fmt: skip

    return nn.Sequential(
        block(1, width), nn.MaxPool2d(2),
        block(width, 2 * width), nn.MaxPool2d(2),
        block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(4 * width, 10),
    )  # fmt: skip


def conv_blocks(model: nn.Sequential) -> list[nn.Module]:
    return [m for m in model if isinstance(m, nn.Sequential)]


def sgd_for(model, data, opt, seconds: float, device: str, seed: int) -> int:
    """Plain SGD for a wall-time budget; returns the number of steps taken."""
    model.train()
    steps, timer = 0, Timer().__enter__()
    while True:
        for xb, yb in batches(data.train_x, data.train_y, 128, shuffle=True, seed=seed + steps):
            loss = nn.functional.cross_entropy(model(xb.to(device)), yb.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            timer.__exit__()
            if timer.seconds >= seconds:
                return steps


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=4, seeds=2)
    p.add_argument("--ridge", type=float, default=1.0, help="ridge penalty of the refit")
    args = p.parse_args()
    if args.smoke:
        args.epochs, args.seeds = 1, 1
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    data = get_data(args, 6000, 2000)
    dev, progress = args.device, not args.no_progress
    refit_loader = list(batches(data.train_x, data.train_y, 256, shuffle=False))
    refit_loader = [(x.to(dev), y.to(dev)) for x, y in refit_loader]
    width = 8 if args.smoke else 32
    print(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test, "
          f"{args.epochs} epochs, {args.seeds} seed(s), ridge={args.ridge}")  # fmt: skip
    names = ["sgd", "sgd + refit", "sgd + same-time SGD", "fast retraining"]
    acc = {n: [] for n in names}
    secs = {n: [] for n in names}
    for seed in range(args.seeds):
        # plain SGD
        torch.manual_seed(seed)
        model = small_cnn(width).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        with Timer() as t:
            for e in range(args.epochs):
                train_epoch(model, data, opt, device=dev, seed=1000 * seed + e, progress=progress)
        acc["sgd"].append(accuracy(model, data.test_x, data.test_y, device=dev))
        secs["sgd"].append(t.seconds)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        opt_state = opt.state_dict()
        # + refit of the classifier
        res = pinv_refit_dense(model[-1], refit_loader, model=model, ridge=args.ridge,
                               evaluate=False, progress=progress)  # fmt: skip
        acc["sgd + refit"].append(accuracy(model, data.test_x, data.test_y, device=dev))
        secs["sgd + refit"].append(t.seconds + res.seconds)
        # + SGD for the same time instead
        model.load_state_dict(state)
        opt.load_state_dict(opt_state)
        steps = sgd_for(model, data, opt, res.seconds, dev, seed=5000 + seed)
        acc["sgd + same-time SGD"].append(accuracy(model, data.test_x, data.test_y, device=dev))
        secs["sgd + same-time SGD"].append(t.seconds + res.seconds)
        print(f"seed {seed}: refit {res.seconds:.2f} s ({res.solver}, cond~{res.condition:.1e},"
              f" train mse {res.mse:.4f}); same time = {steps} SGD steps")  # fmt: skip
        # fast retraining from scratch: random conv blocks frozen, SGD epoch, MP refinement
        torch.manual_seed(seed)
        model = small_cnn(width).to(dev)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        paper = RandomLayerTraining.PAPER_SCHEDULE
        schedule = [paper[e * len(paper) // args.epochs] for e in range(args.epochs)]
        rlt = RandomLayerTraining(conv_blocks(model), seed=seed, schedule=schedule)
        with Timer() as t:
            for e in range(args.epochs):
                train_epoch(model, data, opt, device=dev, seed=1000 * seed + e, progress=progress)
                pinv_refit_dense(model[-1], refit_loader, model=model, ridge=args.ridge,
                                 start="current", step_size=0.5, evaluate=False)  # fmt: skip
                rlt.step()
        rlt.restore()
        acc["fast retraining"].append(accuracy(model, data.test_x, data.test_y, device=dev))
        secs["fast retraining"].append(t.seconds)

    rows = [[n, mean_std(acc[n]), mean_std(secs[n])] for n in names]
    print_table(["method", "test accuracy", "wall time (s)"], rows)
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.5))
    means = [sum(acc[n]) / len(acc[n]) for n in names]
    times = [sum(secs[n]) / len(secs[n]) for n in names]
    axes[0].barh(names, means)
    axes[0].set_xlim(min(means) - 0.05, min(1.0, max(means) + 0.02))
    axes[0].set_xlabel("test accuracy")
    axes[1].barh(names, times)
    axes[1].set_xlabel("wall time (s)")
    fig.suptitle(f"fast retraining, {data.name}, {len(data.train_y)} train images")
    save_figure(args, fig, "refit.png")


if __name__ == "__main__":
    main()
