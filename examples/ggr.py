"""GGR example: refine a trained classifier's first layer with a generative reference gradient.

1. Train a small CNN (or ResNet-20 with ``--model resnet20``) on Fashion-MNIST for a few epochs.
2. Fit a ReferenceDecoder whose last layer mirrors the classifier's first conv.
3. From the same trained weights, fine-tune for ``--epochs`` at a small learning rate twice:
   plain cross-entropy (the control) and cross-entropy + GGR.
4. Print test accuracy and the mean per-filter variance of the first layer before and after,
   and save a plot (``ggr.png``).

    python examples/ggr.py                         # a few minutes on 2 CPU cores
    python examples/ggr.py --smoke --no-progress   # seconds (used by the tests)

Paper: Reza & Jung, IEEE Access 2025, https://doi.org/10.1109/ACCESS.2025.3534216
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
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

from torch_recal import GenerativeGradientLoss, ReferenceDecoder, first_layer_filter_stats
from torch_recal.models import resnet20


class SmallCNN(nn.Module):
    """conv1 (1 -> 16, 3x3) + two strided conv stages + global pooling + linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.features = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


def build(name: str, num_classes: int) -> nn.Module:
    return resnet20(in_chans=1, num_classes=num_classes) if name == "resnet20" else SmallCNN()


def ce_plus(ggr: GenerativeGradientLoss):
    """The ``loss_fn`` for ``train_epoch``: cross-entropy + the GGR term."""

    def loss_fn(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(model(xb), yb)
        return ce + ggr(ce, xb)

    return loss_fn


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=3, seeds=1)
    p.add_argument("--model", default="small", choices=["small", "resnet20"])
    p.add_argument("--pre-epochs", type=int, default=4, help="epochs of ordinary training")
    p.add_argument("--lr", type=float, default=0.05, help="learning rate of ordinary training")
    p.add_argument("--refine-lr", type=float, default=0.005, help="learning rate of refining")
    p.add_argument("--weight", type=float, default=0.003, help="GGR weight (lambda)")
    p.add_argument("--discrepancy", default="cosine", choices=["cosine", "l2", "l1"])
    p.add_argument("--every", type=int, default=1)
    p.add_argument("--decoder-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = p.parse_args()
    if args.smoke:
        args.epochs, args.pre_epochs, args.decoder_epochs = 1, 1, 1
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    device = args.device
    data = get_data(args, n_train=12000, n_test=5000)
    print(
        f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test, model {args.model}, "
        f"{args.pre_epochs} + {args.epochs} epochs, GGR {args.discrepancy} weight {args.weight} "
        f"every {args.every}, refine lr {args.refine_lr}, device {device}"
    )

    rows, results = [], []
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        model = build(args.model, data.num_classes).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
        with Timer() as t_pre:
            for epoch in range(args.pre_epochs):
                train_epoch(model, data, opt, device=device, seed=1000 * seed + epoch,
                            progress=progress, desc=f"pretrain {epoch}")  # fmt: skip
        trained = copy.deepcopy(model.state_dict())
        acc0 = accuracy(model, data.test_x, data.test_y, device=device)
        var0 = first_layer_filter_stats(model.conv1)

        out: dict[str, tuple[float, float, torch.Tensor, float]] = {}
        for method in ("control", "GGR"):
            torch.manual_seed(seed)
            model.load_state_dict(trained)
            opt = torch.optim.SGD(model.parameters(), lr=args.refine_lr, momentum=0.9)
            loss_fn = None
            with Timer() as timer:
                if method == "GGR":
                    decoder = ReferenceDecoder.for_layer(model.conv1)
                    loader = [xb for xb, _ in batches(data.train_x, data.train_y, 128,
                                                      shuffle=True, seed=seed)]  # fmt: skip
                    decoder.fit(loader, epochs=args.decoder_epochs, progress=progress)
                    ggr = GenerativeGradientLoss(
                        model.conv1.weight,
                        decoder,
                        discrepancy=args.discrepancy,
                        weight=args.weight,
                        every=args.every,
                    )

                    loss_fn = ce_plus(ggr)

                for epoch in range(args.epochs):
                    train_epoch(model, data, opt, device=device, seed=1000 * seed + 100 + epoch,
                                progress=progress, desc=f"{method} {epoch}",
                                loss_fn=loss_fn)  # fmt: skip
            acc = accuracy(model, data.test_x, data.test_y, device=device)
            stats = first_layer_filter_stats(model.conv1)
            out[method] = (acc, stats.mean_variance, stats.variance, timer.seconds)
        results.append((acc0, var0, out))
        print(f"seed {seed}: pretraining {t_pre.seconds:.0f} s")

    def col(fn) -> str:
        return mean_std([fn(r) for r in results])

    rows.append(["trained (before)", col(lambda r: r[0]), col(lambda r: r[1].mean_variance), "-"])
    for method in ("control", "GGR"):
        rows.append(
            [
                f"+ {args.epochs} ep {'CE (control)' if method == 'control' else 'CE + GGR'}",
                col(lambda r, m=method: r[2][m][0]),
                col(lambda r, m=method: r[2][m][1]),
                col(lambda r, m=method: r[2][m][3]),
            ]
        )
    print_table(["model", "test accuracy", "conv1 mean filter variance", "refine time (s)"], rows)

    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(10, 3.8))
    acc0, var0, out = results[0]
    order = torch.argsort(var0.variance)
    axes[0].plot(var0.variance[order].numpy(), "o-", label=f"trained ({acc0:.4f})")
    for method, marker in (("control", "s-"), ("GGR", "^-")):
        axes[0].plot(
            out[method][2][order].numpy(), marker, label=f"{method} ({out[method][0]:.4f})"
        )
    axes[0].set_xlabel("conv1 filter (sorted by trained variance)")
    axes[0].set_ylabel("per-filter weight variance")
    axes[0].set_title("first-layer filter variance (seed 0)")
    axes[0].legend()
    names = ["trained", "control", "GGR"]
    accs = [[r[0] for r in results], *[[r[2][m][0] for r in results] for m in ("control", "GGR")]]
    axes[1].bar(names, [sum(a) / len(a) for a in accs], color=["gray", "tab:blue", "tab:orange"])
    low = min(min(a) for a in accs)
    axes[1].set_ylim(max(0.0, low - 0.02), min(1.0, max(max(a) for a in accs) + 0.01))
    axes[1].set_ylabel(f"test accuracy (mean of {len(results)} seed(s))")
    axes[1].set_title(f"{data.name}, {args.model}")
    save_figure(args, fig, "ggr.png")


if __name__ == "__main__":
    main()
