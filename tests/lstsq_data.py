"""Data and comparisons shared by the ridge / refit tests (references stay in the tests)."""

from __future__ import annotations

import numpy as np
import torch


def make_data(n=600, d=12, k=4, seed=0, scales=None, offset=0.0, dtype=torch.float64):
    """Features ``(n, d)`` and labels in ``[0, k)`` from a random linear rule (every class
    present)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=torch.float64)
    if scales is not None:
        h = h * scales
    h = h + offset
    y = (h @ torch.randn(d, k, generator=g, dtype=torch.float64)).argmax(1)
    y[:k] = torch.arange(k)
    return h.to(dtype), y


def batches(h, y, batch_size):
    """A re-iterable loader: a list of ``(h, y)`` pairs."""
    return [(h[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def onehot(y, k):
    return np.eye(k)[y.numpy()]


def rel(a, b):
    """Largest absolute difference relative to the largest entry of the reference ``b``."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-300))


class OnePass:
    """Re-iterable in name only: every pass after the first is empty."""

    def __init__(self, items: list) -> None:
        self.items, self.used = items, False

    def __iter__(self):
        if self.used:
            return iter(())
        self.used = True
        return iter(self.items)
