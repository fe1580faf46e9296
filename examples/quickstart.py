"""Quickstart: a network you can ship smaller, from one line in your training loop.

An MLP (784-512-512-10) on real Fashion-MNIST (offline), trained three ways with the same
seed, data, batches and SGD schedule:

* dense: plain training;
* ``CoherentStrongReg(..., target_sparsity=0.9)``: 90 % of the weights are exact zeros at the
  end, saved with ``save_sparse`` (a bitmask plus the non-zero values);
* ``CoherentStrongReg(..., target_sparsity=0.75, group="unit")``: whole hidden units die,
  and ``shrink(model)`` removes them: a smaller *dense* model with the same outputs.

It prints test accuracy, the parameters of the model you ship, the file size and the CPU
latency of a batch side by side, and writes ``outputs/quickstart.png``.

    python examples/quickstart.py            # about 30 s on 2 CPU cores (after installation)
    python examples/quickstart.py --smoke    # seconds
"""

from __future__ import annotations

import io
import statistics
import time

import torch
from _common import Timer, accuracy, get_data, parser, plt, print_table, save_figure
from _common import train_epoch as _train_epoch
from torch import nn

from torch_recal import CoherentStrongReg, save_sparse, shrink


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )  # fmt: skip


def train(data, args, **budget) -> tuple[nn.Module, float]:
    """SGD (momentum 0.9, lr 0.05, cosine to 0, batch 128); with ``budget`` the regulariser
    is attached: the one-line change."""
    torch.manual_seed(0)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = args.epochs * ((len(data.train_y) + 127) // 128)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    params = list(model.named_parameters())
    if budget.get("group") == "unit":  # the output layer's units are the classes: keep them
        params = params[:-2]
    if budget:  # <- the one-line change (plus the import)
        CoherentStrongReg(params, optimizer=opt, **budget).attach()
    with Timer() as t:
        for epoch in range(args.epochs):
            _train_epoch(model, data, opt, device="cpu", seed=epoch, after_step=sched.step,
                         progress=not args.no_progress, desc=str(budget or "dense"))  # fmt: skip
    return model, t.seconds


def file_bytes(state: dict, sparse: bool) -> int:
    buffer = io.BytesIO()
    (save_sparse if sparse else torch.save)(state, buffer)
    return buffer.getbuffer().nbytes


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median CPU time of one forward pass of the batch ``x`` (eval mode)."""
    model.eval()
    model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main() -> None:
    args = parser(__doc__.splitlines()[0], epochs=8).parse_args()
    if args.smoke:
        args.epochs = 1
    torch.set_num_threads(max(1, torch.get_num_threads()))
    data = get_data(args, n_train=20_000, n_test=5_000)
    print(f"{data.name}: {len(data.train_y)} train / {len(data.test_y)} test images, "
          f"{args.epochs} epochs, CPU threads {torch.get_num_threads()}")  # fmt: skip
    dense, t_dense = train(data, args)
    sparse, t_sparse = train(data, args, target_sparsity=0.9)
    grouped, t_group = train(data, args, target_sparsity=0.75, group="unit")
    x = data.test_x[:256]
    small, report = shrink(grouped, example_inputs=x)  # checks the outputs on x
    repeats = 5 if args.smoke else 50
    arms = [  # (label, model evaluated, model shipped, file bytes, train seconds)
        ("dense", dense, dense, file_bytes(dense.state_dict(), False), t_dense),
        ("target_sparsity=0.9 + save_sparse", sparse, sparse,
         file_bytes(sparse.state_dict(), True), t_sparse),
        ('target_sparsity=0.75, group="unit" + shrink', grouped, small,
         file_bytes(small.state_dict(), False), t_group),
    ]  # fmt: skip
    rows, figures = [], []
    for label, trained, shipped, size, seconds in arms:
        acc = accuracy(trained, data.test_x, data.test_y, device="cpu")
        nonzero = sum(int((p != 0).sum()) for p in shipped.parameters())
        params = sum(p.numel() for p in shipped.parameters())
        ms = latency_ms(shipped, x, repeats)
        rows.append([label, f"{acc:.4f}", f"{params:,}", f"{nonzero:,}", f"{size / 1e6:.2f} MB",
                     f"{ms:.2f} ms", f"{seconds:.0f} s"])  # fmt: skip
        figures.append((label, acc, size / 1e6, ms))
    shrunk = accuracy(small, data.test_x, data.test_y, device="cpu")
    print()
    print_table(["model", "test accuracy", "params shipped", "non-zero", "file",
                 "CPU latency (256 images)", "training"], rows)  # fmt: skip
    print(f"\nshrink(): {report.params_before:,} -> {report.params_after:,} parameters, "
          f"units per layer {[layer.units_after for layer in report.layers]}; the shrunk model's "
          f"test accuracy {shrunk:.4f}; largest output difference on 256 images "
          f"{report.max_abs_error:.1e}")  # fmt: skip

    pyplot = plt()
    fig, axes = pyplot.subplots(1, 3, figsize=(11, 3.4))
    names = ["dense", "90 % sparse", "units shrunk"]
    panels = [(1, "test accuracy"), (2, "file (MB)"), (3, "CPU latency, 256 images (ms)")]
    for ax, (i, title) in zip(axes, panels, strict=True):
        values = [f[i] for f in figures]
        ax.bar(names, values, color=["tab:gray", "tab:blue", "tab:green"])
        ax.set_title(title, fontsize=9)
        if i == 1:
            ax.set_ylim(min(values) - 0.05, 1.0)
    fig.suptitle(f"{data.name}, MLP 784-512-512-10, {args.epochs} epochs", fontsize=9)
    save_figure(args, fig, "quickstart.png")


if __name__ == "__main__":
    main()
