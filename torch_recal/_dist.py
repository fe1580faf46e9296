"""torch.distributed helpers: the one place where the library talks to other ranks.

Every function is a no-op (or returns the single-process answer) when
``torch.distributed`` is unavailable or not initialised, so library code calls them
unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = [
    "all_reduce_sum_",
    "broadcast_",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "raise_if_any_rank_failed",
]


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


def raise_if_any_rank_failed(error: Exception | None, where: str, device: torch.device) -> None:
    """Make a local failure collective, so that no rank is left waiting in a later collective.

    Every rank calls this at the same point, passing the exception its local phase raised (or
    ``None``). Alone, it re-raises ``error``. Distributed, one small all-reduce tells every
    rank whether any rank failed; if so the failing ranks re-raise their own exception and the
    others raise a ``RuntimeError`` that names the failed ranks and their messages.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    failed = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.SUM)
    if int(failed.item()) == 0:
        return
    mine = None if error is None else f"{type(error).__name__}: {error}"
    messages: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(messages, mine)
    if error is not None:
        raise error
    report = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m is not None)
    raise RuntimeError(f"{where}: failed on another rank, so this rank stopped too ({report})")
