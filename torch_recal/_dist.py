"""torch.distributed helpers: the one place where the library talks to other ranks.

Every function is a no-op (or returns the single-process answer) when
``torch.distributed`` is unavailable or not initialised, so library code calls them
unconditionally.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "all_reduce_mean_",
    "all_reduce_over_shards_",
    "all_reduce_sum_",
    "broadcast_",
    "copy_full_",
    "full_tensor",
    "get_rank",
    "get_world_size",
    "is_distributed",
    "is_dtensor",
    "is_sharded",
    "local_tensor",
    "raise_if_any_rank_failed",
    "reshard_fsdp",
]


@functools.cache
def _fsdp2() -> tuple[Any, Any, Any]:
    """``(DTensor, FSDPModule, distribute_tensor)``, each None when this torch lacks it.

    Imported on first use (importing FSDP costs time) from their public homes, or the
    private ones of torch < 2.6.
    """
    import importlib

    def first(*paths: tuple[str, str]) -> Any:
        for module, name in paths:
            try:
                return getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):
                continue
        return None

    return (
        first(("torch.distributed.tensor", "DTensor"), ("torch.distributed._tensor", "DTensor")),
        first(
            ("torch.distributed.fsdp", "FSDPModule"),
            ("torch.distributed._composable.fsdp", "FSDPModule"),
        ),
        first(
            ("torch.distributed.tensor", "distribute_tensor"),
            ("torch.distributed._tensor", "distribute_tensor"),
        ),
    )


def _loaded(*modules: str) -> bool:
    """Whether the user's code imported one of these: no DTensor / FSDP2 module can exist
    otherwise, and importing them only to find none would slow the first call down."""
    return any(name in sys.modules for name in modules)


def is_dtensor(t: object) -> bool:
    """True for a DTensor (FSDP2 ``fully_shard``, tensor parallel)."""
    if not dist.is_available() or not _loaded(
        "torch.distributed.tensor", "torch.distributed._tensor"
    ):
        return False
    dtensor = _fsdp2()[0]
    return dtensor is not None and isinstance(t, dtensor)


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


def all_reduce_mean_(*tensors: torch.Tensor) -> None:
    """Average tensors in place over all ranks (:func:`all_reduce_sum_`, then divide)."""
    if not is_distributed():
        return
    all_reduce_sum_(*tensors)
    world = get_world_size()
    for t in tensors:
        t.div_(world)


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


# -- FSDP2 / DTensor ------------------------------------------------------------------------
def is_sharded(t: torch.Tensor) -> bool:
    """True for a DTensor (FSDP2 ``fully_shard``, tensor parallel) or an FSDP1 flat parameter."""
    return is_dtensor(t) or bool(getattr(t, "_fsdp_flattened", False))


def reshard_fsdp(model: nn.Module) -> None:
    """Put the sharded parameters of every FSDP2 module in ``model`` back in place.

    After a ``no_grad`` forward, FSDP2 keeps the root module's parameters gathered: the
    module then holds full-size temporaries, and a write to them would be lost. A no-op
    without FSDP2.
    """
    if not dist.is_available() or not _loaded(
        "torch.distributed.fsdp", "torch.distributed._composable.fsdp"
    ):
        return
    fsdp_module = _fsdp2()[1]
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module):
            module.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``t`` itself, or a DTensor gathered from all ranks (a collective)."""
    if is_dtensor(t):
        return t.full_tensor()  # type: ignore[attr-defined]
    return t


def copy_full_(dst: torch.Tensor, full: torch.Tensor) -> None:
    """``dst.copy_(full)`` where ``dst`` may be a DTensor shard and ``full`` is the whole value,
    the same on every rank (each rank keeps its own slice; no communication)."""
    if is_dtensor(dst):
        import inspect

        distribute_tensor = _fsdp2()[2]
        kwargs: dict[str, Any] = {}
        if "src_data_rank" in inspect.signature(distribute_tensor).parameters:
            kwargs["src_data_rank"] = None  # slice locally: every rank holds the same `full`
        full = distribute_tensor(
            full.to(dst.device, dst.dtype),
            dst.device_mesh,  # type: ignore[attr-defined]
            dst.placements,  # type: ignore[attr-defined]
            **kwargs,
        )
    dst.copy_(full)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a view: in-place ops change the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t  # type: ignore[attr-defined]


def all_reduce_over_shards_(stats: torch.Tensor, like: torch.Tensor) -> None:
    """Sum ``stats``, computed from this rank's slices of DTensors placed like ``like``, over
    the mesh dimensions along which ``like`` is sharded (replicated dimensions hold copies and
    are not summed), so that every rank gets the statistics of the whole tensors."""
    try:
        from torch.distributed.tensor import Shard
    except ImportError:  # torch < 2.5
        from torch.distributed._tensor import Shard  # type: ignore[no-redef]

    mesh = like.device_mesh  # type: ignore[attr-defined]
    for dim, placement in enumerate(like.placements):  # type: ignore[attr-defined]
        if isinstance(placement, Shard):
            dist.all_reduce(stats, op=dist.ReduceOp.SUM, group=mesh.get_group(dim))
