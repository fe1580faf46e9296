"""Shared plumbing for the examples: arguments, batching, training, tables, plots."""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from data import Data, load_dataset

try:
    from tqdm.auto import tqdm
except ImportError:  # progress bars are optional

    def tqdm(it, **_kw):  # type: ignore[no-redef]
        return it


def parser(description: str, *, epochs: int, seeds: int = 1) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny run in seconds (for tests)")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--seeds", type=int, default=seeds, help="number of seeds (0, 1, ...)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dataset", default="auto", choices=["auto", "fashion-mnist", "mnist5k"])
    p.add_argument("--data-dir", default=None, help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--n-train", type=int, default=None, help="use a random training subset")
    p.add_argument("--out", default="outputs", help="where the plot is written")
    p.add_argument("--no-progress", action="store_true")
    return p


def get_data(args: argparse.Namespace, n_train: int | None, n_test: int | None) -> Data:
    data = load_dataset(args.dataset, args.data_dir)
    if args.smoke:
        n_train, n_test = 256, 256
    if args.n_train is not None:
        n_train = args.n_train
    return data.subset(n_train, n_test)


def batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    order = (
        torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
        if shuffle
        else torch.arange(len(y))
    )
    for i in range(0, len(y), batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def train_epoch(
    model: nn.Module,
    data: Data,
    optimizer: torch.optim.Optimizer,
    *,
    device: str,
    batch_size: int = 128,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
    after_backward: Callable[[], None] | None = None,
    after_step: Callable[[], None] | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> float:
    """One epoch of plain supervised training; returns the mean training loss."""
    model.train()
    total, count = 0.0, 0
    n_batches = (len(data.train_y) + batch_size - 1) // batch_size
    it = batches(data.train_x, data.train_y, batch_size, shuffle=True, seed=seed)
    for xb, yb in tqdm(it, total=n_batches, desc=desc, leave=False, disable=not progress):
        xb, yb = xb.to(device), yb.to(device)
        if loss_fn is None:
            loss = nn.functional.cross_entropy(model(xb), yb)
        else:
            loss = loss_fn(model, xb, yb)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        total += loss.item() * len(yb)
        count += len(yb)
    return total / max(count, 1)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device: str) -> float:
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, 512, shuffle=False):
        correct += (model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
    return correct / len(y)


def mean_std(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(cells[0], widths, strict=True)) + " |"
    print(line)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells[1:]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")


def out_path(args: argparse.Namespace, name: str) -> Path:
    path = Path(args.out)
    path.mkdir(parents=True, exist_ok=True)
    return path / name


def plt():
    """matplotlib.pyplot with a headless backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


def fit(
    model: nn.Module,
    data: Data,
    args: argparse.Namespace,
    *,
    seed: int,
    name: str,
    lr: float = 0.1,
    batch_size: int = 128,
) -> dict:
    """SGD (momentum 0.9, nesterov, wd 5e-4) with a one-cycle lr over ``args.epochs`` epochs.

    Returns the final training loss, the test-accuracy curve (one point per epoch), the
    training seconds and the parameter count.
    """
    model = model.to(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = args.epochs * ((len(data.train_y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    curve, seconds, loss = [], 0.0, float("nan")
    for epoch in range(args.epochs):
        with Timer() as t:
            loss = train_epoch(
                model, data, opt, device=args.device, batch_size=batch_size,
                seed=seed * 1000 + epoch, progress=not args.no_progress,
                desc=f"{name} seed {seed} epoch {epoch + 1}/{args.epochs}", after_step=sched.step,
            )  # fmt: skip
        seconds += t.seconds
        curve.append(accuracy(model, data.test_x, data.test_y, device=args.device))
    n_params = sum(p.numel() for p in model.parameters())
    return {"loss": loss, "acc": curve[-1], "curve": curve, "seconds": seconds, "params": n_params}


def save_figure(args: argparse.Namespace, fig, name: str) -> Path:
    """Lay out, write ``<args.out>/<name>``, close, and say where; returns the path."""
    fig.tight_layout()
    path = out_path(args, name)
    fig.savefig(path, dpi=120)
    plt().close(fig)
    print(f"plot written to {path}")
    return path


def plot_curves(
    args: argparse.Namespace, results: dict[str, list[dict]], title: str, name: str
) -> Path:
    """Mean test-accuracy curve per method (one line each); returns the PNG path."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(5.5, 3.4))
    for label, runs in results.items():
        curves = torch.tensor([r["curve"] for r in runs])
        ax.plot(range(1, curves.shape[1] + 1), curves.mean(0), marker="o", label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_title(title)
    ax.legend()
    return save_figure(args, fig, name)


def report(args: argparse.Namespace, results: dict[str, list[dict]], title: str, plot: str) -> None:
    """Print the standard results table of :func:`fit` runs and write the accuracy plot."""
    rows = [
        [name, f"{runs[0]['params']:,}", mean_std([r["loss"] for r in runs]),
         mean_std([r["acc"] for r in runs]), f"{sum(r['seconds'] for r in runs) / len(runs):.0f}"]
        for name, runs in results.items()
    ]  # fmt: skip
    print()
    print_table(["model", "params", "final train loss", "test accuracy", "train s/run"], rows)
    plot_curves(args, results, title, plot)
