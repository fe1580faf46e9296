"""All five pieces in one ordinary training loop (real Fashion-MNIST, a small ResNet).

    python examples/all_in_one.py          # a few minutes on 2 CPU cores
    python examples/all_in_one.py --smoke

Each piece is one or two lines in a plain PyTorch loop:

* ``calibrate(model)``                       ResCNet response calibration in every block
* ``GenerativeGradientLoss(..., every=4)``   GGR term on the first conv, every 4th step
* ``CoherentStrongReg(...).attach()`` gated strong proximal L1 -> exact zeros
* ``RandomLayerTraining(blocks)``            only the last k blocks train in each epoch
* ``RifleScheduler(model, num_resets=1)``    re-initialise the head once, halfway
* ``pinv_refit_dense(model.fc, ...)``        closed-form ridge refit of the head at the end

This shows that they compose (state, hooks-free forward, compile policy); it is not a tuned
recipe. Prints a per-epoch table and writes ``outputs/all_in_one.png``.
"""

from __future__ import annotations

import torch
from _common import Timer, accuracy, batches, get_data, parser, plt, print_table, save_figure, tqdm
from torch import nn

from torch_recal import (
    CoherentStrongReg,
    GenerativeGradientLoss,
    RandomLayerTraining,
    ReferenceDecoder,
    RifleScheduler,
    calibrate,
    compression_report,
    first_layer_filter_stats,
    pinv_refit_dense,
)
from torch_recal.models import resnet20


def main() -> None:
    p = parser(__doc__.splitlines()[0], epochs=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--l1", type=float, default=2e-4, help="CoherentStrongReg strength")
    args = p.parse_args()
    if args.smoke:
        args.epochs = 2
    data = get_data(args, n_train=8_000, n_test=2_000)
    dev, bs = args.device, args.batch_size
    torch.manual_seed(0)
    print(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test, {args.epochs} epochs")

    model = calibrate(resnet20(num_classes=data.num_classes, in_chans=1)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    decoder = ReferenceDecoder.for_layer(model.conv1)
    decoder.fit(batches(data.train_x, data.train_y, bs, shuffle=True), epochs=1, lr=3e-3)
    ggr = GenerativeGradientLoss(model.conv1.weight, decoder, weight=0.003, every=4)
    reg = CoherentStrongReg(model.named_parameters(), strength=args.l1, optimizer=opt)
    reg.attach()  # the optimizer's step now runs the regulariser
    blocks = [b for stage in (model.layer1, model.layer2, model.layer3) for b in stage]
    layers = RandomLayerTraining(blocks, min_trainable=3, seed=0)
    rifle = RifleScheduler(model, total_epochs=args.epochs, num_resets=1, seed=0)
    print("RIFLE re-initialises the head after epochs", rifle.schedule())

    rows, curve = [], []
    for epoch in range(args.epochs):
        model.train()
        n_batches = (len(data.train_y) + bs - 1) // bs
        it = batches(data.train_x, data.train_y, bs, shuffle=True, seed=epoch)
        with Timer() as t:
            for x, y in tqdm(it, total=n_batches, leave=False, disable=args.no_progress):
                x, y = x.to(dev), y.to(dev)
                loss = nn.functional.cross_entropy(model(x), y)
                loss = loss + ggr(loss, x)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        acc = accuracy(model, data.test_x, data.test_y, device=dev)
        curve.append(acc)
        report = compression_report(model)
        rows.append([
            epoch + 1, f"{loss.item():.3f}", f"{acc:.4f}", f"{report.compression_ratio:.2f}x",
            "on" if reg.is_active else "off", sum(layers.trainable), f"{t.seconds:.0f}",
        ])  # fmt: skip
        layers.step()  # choose the blocks that train next epoch
        if rifle.step():
            rows[-1].append("head re-initialised")

    layers.restore()
    train_loader = batches(data.train_x, data.train_y, 512, shuffle=False)
    result = pinv_refit_dense(model.fc, train_loader, model=model, num_classes=data.num_classes)
    refit_acc = accuracy(model, data.test_x, data.test_y, device=dev)
    report = compression_report(model)
    rows.append(["refit", "", f"{refit_acc:.4f}", f"{report.compression_ratio:.2f}x", "", "",
                 f"{result.seconds:.1f}"])  # fmt: skip
    print()
    headers = [
        "epoch",
        "train loss",
        "test acc",
        "compression",
        "L1 gate",
        "trained blocks",
        "s",
        "note",
    ]
    print_table(headers, [r + [""] * (len(headers) - len(r)) for r in rows])
    var = first_layer_filter_stats(model.conv1).variance.mean().item()
    print(f"\nconv1 mean filter variance {var:.4f}; {report.zeros:,} of {report.total:,} "
          f"regularised weights are exactly zero")  # fmt: skip

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 3.4))
    ax.plot(range(1, len(curve) + 1), curve, marker="o", label="SGD epochs")
    ax.scatter([len(curve)], [refit_acc], color="C3", zorder=3, label="after pinv_refit_dense")
    for e in rifle.schedule():
        ax.axvline(e + 1, color="grey", ls="--", lw=1)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title("all five pieces (dashed: RIFLE reset)")
    ax.legend()
    save_figure(args, fig, "all_in_one.png")


if __name__ == "__main__":
    main()
