"""Tiny timing helpers shared by the benchmark scripts (interleaved medians, CUDA-synchronised)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved(
    fns: dict[str, Callable[[], object]], device: str, *, rounds: int = 9, calls: int = 10
) -> dict[str, float]:
    """Median over ``rounds`` of the mean time per call of each fn, the fns interleaved.

    Timing the contenders back to back in every round, and taking medians, keeps a shared
    or throttling machine from favouring whichever contender happened to run in a quiet
    moment.
    """
    for fn in fns.values():  # warm-up (and compile)
        for _ in range(3):
            fn()
    sync(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(device)
            samples[name].append((time.perf_counter() - start) / calls)
    return {name: statistics.median(ts) for name, ts in samples.items()}


def table(headers: list[str], rows: list[list[object]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep, *map(fmt, cells[1:])])
