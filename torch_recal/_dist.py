"""torch.distributed helpers: the one place where the library talks to other ranks.

Every function is a no-op (or returns the single-process answer) when
``torch.distributed`` is unavailable or not initialised, so library code calls them
unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum_", "broadcast_", "get_rank", "get_world_size", "is_distributed"]


def is_distributed() -> bool:
    """True when a default process group is up and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum tensors in place over all ranks, coalesced into one collective per dtype/device.

    A no-op when not distributed.
    """
    if not is_distributed():
        return
    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for t in group:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()


def broadcast_(*tensors: torch.Tensor, src: int = 0) -> None:
    """Overwrite each tensor in place with rank ``src``'s copy (no-op alone)."""
    if not is_distributed():
        return
    for t in tensors:
        dist.broadcast(t, src=src)
