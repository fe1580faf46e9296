"""ResNet vs SE-ResNet vs ResCNet (same depth) on real Fashion-MNIST, mean ± std over seeds.

    python examples/rescnet.py                # 3 seeds, 2 epochs, 6k images: minutes on 2 cores
    python examples/rescnet.py --depth 32 --epochs 10 --n-train 60000   # closer to the paper
    python examples/rescnet.py --smoke

ResCNet = the same CIFAR-style ResNet with ``ResponseCalibration(reduction=4)`` in every
block (``resnet20(calibrated=True)``); SE-ResNet puts squeeze-and-excitation in the same place.
Prints a table and writes ``outputs/rescnet.png``.
"""

from __future__ import annotations

import torch
from _common import fit, get_data, parser, report

from torch_recal.models import CifarResNet


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=2, seeds=3)
    p.add_argument("--depth", type=int, default=20, help="6n + 2: 20, 32, 56")
    args = p.parse_args()
    if args.smoke:
        args.epochs, args.seeds, args.depth = 1, 1, 8
    data = get_data(args, n_train=6_000, n_test=2_000)
    print(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test, depth {args.depth}, "
          f"{args.epochs} epochs, {args.seeds} seeds")  # fmt: skip
    variants = {
        f"ResNet-{args.depth}": {},
        f"SE-ResNet-{args.depth}": {"se": True},
        f"ResCNet-{args.depth}": {"calibrated": True},
    }
    results: dict[str, list[dict]] = {name: [] for name in variants}
    for seed in range(args.seeds):
        for name, kwargs in variants.items():
            torch.manual_seed(seed)  # same conv/fc init for every variant of a seed
            model = CifarResNet(args.depth, num_classes=data.num_classes, in_chans=1, **kwargs)
            results[name].append(fit(model, data, args, seed=seed, name=name))
    report(args, results, f"{data.name}, {args.seeds} seeds", "rescnet.png")


if __name__ == "__main__":
    main()
