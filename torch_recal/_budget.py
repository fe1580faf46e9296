"""The compression budget behind :class:`~torch_recal.Budget` (private): where the schedule
is, how much sparsity it asks for, which weights (or units) it marks, and the exact top-up.

The schedule's progress ``p`` runs from 0 to 1: with ``total_steps`` it is the step over
``end * total_steps``; otherwise it is read off the learning rate's decay,
``p = (1 - lr / peak) / (1 - freeze_below)``, which reaches 1 exactly when the zero pattern
freezes. The target follows the cubic ramp of gradual magnitude pruning (Zhu & Gupta,
https://arxiv.org/abs/1710.01878): ``s(p) = s_f (1 - (1 - p)^3)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "count_zeros",
    "marked_",
    "progress",
    "ramp",
    "thresholds",
    "top_up_",
]


def progress(
    step: int,
    lrs: list[float],
    peak_lr: float | None,
    *,
    total_steps: int | None,
    end: float,
    freeze_below: float | None,
    delay: int = 0,
) -> float:
    """Where the budget's schedule is, in ``[0, 1]`` (1: reach the target and freeze)."""
    if step < delay:
        return 0.0
    if total_steps is not None:
        span = max(1.0, end * total_steps - delay)
        return min(1.0, (step - delay) / span)
    if not lrs or freeze_below is None:
        return 0.0
    peak = max([*lrs, peak_lr or 0.0])
    if peak <= 0:
        return 0.0
    return min(1.0, max(0.0, (1.0 - max(lrs) / peak) / (1.0 - freeze_below)))


def ramp(target: float, p: float) -> float:
    """The cubic ramp: the sparsity asked for at progress ``p``."""
    return target * (1.0 - (1.0 - p) ** 3)


def _scores(w: Tensor, group: str | None) -> Tensor:
    """What is compared with the threshold: ``|w|`` per entry, or per unit (dim 0) the
    unit's RMS ``||w_u|| / sqrt(n_u)``."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    if group == "unit":
        rows = w.detach().reshape(w.shape[0], -1).to(dtype)
        return torch.linalg.vector_norm(rows, dim=1) / math.sqrt(rows.shape[1])
    return w.detach().abs().reshape(-1).to(dtype)


def _sizes(w: Tensor, group: str | None) -> int:
    """Weights per scored item (1, or a unit's number of entries)."""
    return w[0].numel() if group == "unit" else 1


def thresholds(
    weights: list[Tensor], sparsity: float, allocation: str, group: str | None
) -> list[float]:
    """Per tensor, the score at or below which an entry (a unit) is marked so that a share
    ``sparsity`` of the weights is marked: one threshold over all tensors (``"global"``) or
    one per tensor (``"layer"``)."""
    if sparsity <= 0:
        return [-1.0] * len(weights)
    if allocation == "layer":
        out = []
        for w in weights:
            scores, size = _scores(w, group), _sizes(w, group)
            k = min(len(scores) - (1 if group == "unit" else 0), round(sparsity * w.numel() / size))
            out.append(float(torch.kthvalue(scores, k).values) if k >= 1 else -1.0)
        return out
    scores = torch.cat([_scores(w, group) for w in weights])
    if group != "unit":  # one weight per score: the k-th smallest magnitude
        k = round(sparsity * len(scores))
        return [float(torch.kthvalue(scores, k).values) if k >= 1 else -1.0] * len(weights)
    sizes = torch.cat([torch.full((len(_scores(w, group)),), _sizes(w, group)) for w in weights])
    order = torch.argsort(scores, stable=True)
    covered = torch.cumsum(sizes[order], 0)
    total = sum(w.numel() for w in weights)
    k = int(torch.searchsorted(covered, torch.tensor(sparsity * total), right=False))
    if k >= len(order):
        k = len(order) - 1
    return [float(scores[order[k]])] * len(weights) if covered[k] > 0 else [-1.0] * len(weights)


def marked_(
    weights: list[Tensor], limits: list[float], group: str | None, shrink: float | None
) -> None:
    """The marked entries (units) with scores at or below ``limits``: set to zero
    (``shrink=None``) or soft-thresholded by ``shrink * limit`` towards zero (units: their
    norm reduced by that much per entry RMS). In place; a tensor is never emptied of units."""
    for w, limit in zip(weights, limits, strict=True):
        if limit < 0:
            continue
        if group == "unit":
            rows = w.reshape(w.shape[0], -1)
            rms = _scores(w, group).to(w.dtype)
            mark = rms <= limit
            if bool(mark.all()):  # keep the strongest unit: a layer is never cut off
                mark[torch.argmax(rms)] = False
            if shrink is None:
                rows[mark] = 0.0
            else:
                cut = shrink * limit
                factor = torch.where(rms > cut, 1 - cut / rms.clamp_min(1e-30), 0.0)
                rows.mul_(torch.where(mark, factor, torch.ones_like(factor))[:, None])
            continue
        mark = w.abs() <= limit
        if shrink is None:
            w.masked_fill_(mark, 0.0)
        else:  # soft-threshold: w - clamp(w, -a, a), on the marked entries only
            step = w.clamp(-shrink * limit, shrink * limit)
            w.sub_(step.mul_(mark))


def count_zeros(weights: list[Tensor]) -> tuple[int, int]:
    """``(exact zeros, entries)`` over the tensors."""
    zeros = sum(int((w == 0).sum()) for w in weights)
    return zeros, sum(w.numel() for w in weights)


def top_up_(weights: list[Tensor], sparsity: float, allocation: str, group: str | None) -> None:
    """Zero the smallest entries (units) until exactly ``round(sparsity * n)`` weights are
    zero (per tensor with ``"layer"``; units: the nearest unit boundary at or above it)."""
    if allocation == "layer":
        for w in weights:
            _top_up_one([w], sparsity, group)
        return
    _top_up_one(weights, sparsity, group)


def _top_up_one(weights: list[Tensor], sparsity: float, group: str | None) -> None:
    total = sum(w.numel() for w in weights)
    need = round(sparsity * total) - count_zeros(weights)[0]
    if need <= 0:
        return
    if group == "unit":
        limits = thresholds(weights, sparsity, "global", group)
        marked_(weights, limits, group, None)
        return
    flat = torch.cat([w.detach().reshape(-1) for w in weights])
    live = torch.nonzero(flat != 0).squeeze(1)
    order = live[torch.argsort(flat[live].abs(), stable=True)][:need]
    flat[order] = 0.0
    start = 0
    for w in weights:
        n = w.numel()
        w.copy_(flat[start : start + n].reshape(w.shape))
        start += n
