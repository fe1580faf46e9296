"""Training helpers shared by the protocols: data subsets, batches, augmentation, schedules."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import Data, load_fashion_mnist, load_mnist5k


@functools.lru_cache(maxsize=2)
def fashion(data_dir: str | None = None) -> Data:
    """Fashion-MNIST, loaded once per process."""
    return load_fashion_mnist(data_dir)


@functools.lru_cache(maxsize=1)
def mnist5k() -> Data:
    """The MNIST-5k digits (4,000 / 1,000), loaded once per process."""
    return load_mnist5k()


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of ints (a seed, a purpose, an epoch ...)."""
    value = 0
    for k in key:
        value = (value * 1_000_003 + int(k)) % (2**62)
    return torch.Generator().manual_seed(value)


def split(n: int, sizes: Sequence[int], gen: torch.Generator) -> list[torch.Tensor]:
    """Disjoint random index sets of the given sizes out of ``range(n)``."""
    if sum(sizes) > n:
        raise ValueError(f"asked for {sum(sizes)} samples out of {n}")
    perm = torch.randperm(n, generator=gen)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start : start + s])
        start += s
    return out


def fashion_subsets(
    data_dir: str | None, seed: int, n_train: int, n_val: int, n_test: int
) -> tuple[torch.Tensor, ...]:
    """A seed's Fashion-MNIST subsets: disjoint train and validation sets drawn from the
    training images, a test set from the test images; ``(x, y, val_x, val_y, test_x, test_y)``.
    """
    ds = fashion(data_dir)
    tr, va = split(len(ds.train_y), [n_train, n_val], generator(seed, 1))
    (te,) = split(len(ds.test_y), [n_test], generator(seed, 2))
    return (
        ds.train_x[tr],
        ds.train_y[tr],
        ds.train_x[va],
        ds.train_y[va],
        ds.test_x[te],
        ds.test_y[te],
    )


def pick_classes(
    x: torch.Tensor, y: torch.Tensor, classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples of ``classes``, labels renumbered ``0 .. len(classes) - 1``."""
    keep = torch.isin(y, torch.tensor(list(classes)))
    remap = torch.full((int(y.max()) + 1,), -1, dtype=torch.long)
    remap[torch.tensor(list(classes))] = torch.arange(len(classes))
    return x[keep], remap[y[keep]]


def per_class(y: torch.Tensor, n_per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Indices of ``n_per_class`` random samples of every class (a stratified subset)."""
    perm = torch.randperm(len(y), generator=gen)
    chosen = [perm[y[perm] == c][:n_per_class] for c in range(int(y.max()) + 1)]
    idx = torch.cat(chosen)
    return idx[torch.randperm(len(idx), generator=gen)]


def crop_flip(x: torch.Tensor, pad: int, gen: torch.Generator, flip: bool = True) -> torch.Tensor:
    """Random crop after zero padding by ``pad`` (pad 0 = no crop) and horizontal flip."""
    n, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
        rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
        cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
        batch = torch.arange(n)[:, None, None, None]
        chans = torch.arange(c)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    gen: torch.Generator | None = None,
    *,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Mini-batches; shuffled with ``gen`` when given, in order otherwise."""
    order = torch.randperm(len(y), generator=gen) if gen is not None else torch.arange(len(y))
    stop = len(y) - (len(y) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = order[i : i + batch_size]
        yield x[idx], y[idx]


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def cosine(base: float, t: float, total: float, warmup: float = 0.0) -> float:
    """Linear warm-up for ``warmup`` units, then a cosine from ``base`` to 0 at ``total``."""
    if warmup > 0 and t < warmup:
        return base * (t + 1) / warmup
    progress = (t - warmup) / max(total - warmup, 1e-12)
    return 0.5 * base * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float | Sequence[float]) -> None:
    lrs = [lr] * len(optimizer.param_groups) if isinstance(lr, (int, float)) else list(lr)
    for group, value in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = value


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Eval-mode accuracy; the model's train/eval mode is restored."""
    was = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        correct += int((model(xb).argmax(1) == yb).sum())
    model.train(was)
    return correct / len(y)


@dataclass
class EpochStats:
    loss: float
    train_acc: float  # running accuracy in train mode over the epoch
    cpu_seconds: float  # time.process_time of the epoch (this process, one thread)
    backward_cpu_seconds: float  # the part spent in loss.backward()
    steps: int


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    gen: torch.Generator,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    | None = None,
    before_step: Callable[[int], None] | None = None,
    max_steps: int | None = None,
    drop_last: bool = False,
) -> EpochStats:
    """One epoch of SGD; ``loss_fn(model, x, y) -> (loss, logits)`` defaults to cross-entropy.

    ``before_step(i)`` runs before the i-th step (e.g. to set a per-step lr); ``max_steps``
    stops early (for compute-matched runs).
    """
    model.train()
    t0 = time.process_time()
    backward = 0.0
    total, correct, count, steps = 0.0, 0, 0, 0
    for xb, yb in batches(x, y, batch_size, gen, drop_last=drop_last):
        if max_steps is not None and steps >= max_steps:
            break
        if before_step is not None:
            before_step(steps)
        if augment is not None:
            xb = augment(xb)
        if loss_fn is None:
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
        else:
            loss, logits = loss_fn(model, xb, yb)
        optimizer.zero_grad(set_to_none=True)
        tb = time.process_time()
        loss.backward()
        backward += time.process_time() - tb
        optimizer.step()
        steps += 1
        total += float(loss.detach()) * len(yb)
        correct += int((logits.detach().argmax(1) == yb).sum())
        count += len(yb)
    return EpochStats(
        loss=total / max(count, 1),
        train_acc=correct / max(count, 1),
        cpu_seconds=time.process_time() - t0,
        backward_cpu_seconds=backward,
        steps=steps,
    )


def sgd(
    params, lr: float, *, momentum: float = 0.9, weight_decay: float = 5e-4, nesterov: bool = False
) -> torch.optim.SGD:
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )


def state_copy(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
