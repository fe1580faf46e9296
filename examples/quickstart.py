"""Quickstart: a small ResNet on real Fashion-MNIST, plain vs calibrate(model).

    python examples/quickstart.py            # a few minutes on 2 CPU cores
    python examples/quickstart.py --smoke    # seconds

The only change to the training code is one line: ``model = calibrate(model)``.
Prints a results table and writes ``outputs/quickstart.png``.
"""

from __future__ import annotations

import copy

import torch
from _common import fit, get_data, parser, report

from torch_recal import calibrate
from torch_recal.models import resnet20


def main() -> None:
    args = parser(__doc__.splitlines()[0], epochs=3).parse_args()
    if args.smoke:
        args.epochs = 1
    data = get_data(args, n_train=10_000, n_test=2_000)
    print(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test images, "
          f"{args.epochs} epochs, {args.seeds} seed(s), device {args.device}")  # fmt: skip
    results: dict[str, list[dict]] = {"ResNet-20": [], "ResNet-20 + calibrate()": []}
    for seed in range(args.seeds):
        torch.manual_seed(seed)
        base = resnet20(num_classes=data.num_classes, in_chans=1)
        results["ResNet-20"].append(fit(copy.deepcopy(base), data, args, seed=seed, name="plain"))
        model = calibrate(copy.deepcopy(base))  # <- the one-line change
        results["ResNet-20 + calibrate()"].append(fit(model, data, args, seed=seed, name="calib"))

    report(args, results, f"{data.name}, {len(data.train_y)} train", "quickstart.png")


if __name__ == "__main__":
    main()
