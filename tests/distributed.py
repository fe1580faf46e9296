"""Shared helper: run a function on 2 CPU processes with the gloo backend.

Usage in a test module (the function must live at module level so it can be pickled)::

    def _worker(rank: int, world_size: int, x: torch.Tensor) -> dict:
        ...  # torch.distributed is initialised here (gloo, CPU)
        return {"y": y}

    @pytest.mark.distributed
    def test_something():
        results = run_distributed(_worker, torch.ones(3))
        assert torch.equal(results[0]["y"], results[1]["y"])

Each rank's return value is saved with ``torch.save`` and handed back in rank order. An
exception on any rank fails the test with that rank's traceback. Collectives time out after
``timeout_s`` (default 120 s), so a rank left waiting fails the test instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["needs_fsdp2", "run_distributed"]


def _has_fsdp2() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return True


#: skip marker for tests that shard with FSDP2's public ``fully_shard`` (torch >= 2.6)
needs_fsdp2 = pytest.mark.skipif(
    not _has_fsdp2(), reason="needs torch.distributed.fsdp.fully_shard"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(
    rank: int,
    world_size: int,
    port: int,
    outdir: str,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    os.environ["TORCH_RECAL_COMPILE"] = "0"
    torch.set_num_threads(1)
    path = os.path.join(outdir, f"rank{rank}.pt")
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()  # nobody tears the group down while another rank still uses it
        finally:
            dist.destroy_process_group()
        torch.save({"ok": True, "result": result}, path)
    except BaseException:
        torch.save({"ok": False, "error": traceback.format_exc()}, path)
        raise


def run_distributed(
    fn: Callable[..., Any], *args: Any, world_size: int = 2, timeout_s: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo/CPU processes.

    Returns the list of per-rank return values (rank order).
    """
    port = _free_port()
    with tempfile.TemporaryDirectory() as outdir:
        try:
            mp.spawn(
                _entry, args=(world_size, port, outdir, timeout_s, fn, args), nprocs=world_size
            )
        except Exception as err:
            errors = []
            for rank in range(world_size):
                path = os.path.join(outdir, f"rank{rank}.pt")
                if os.path.exists(path):
                    rec = torch.load(path, weights_only=False)
                    if not rec["ok"]:
                        errors.append(f"--- rank {rank} ---\n{rec['error']}")
            raise AssertionError("distributed worker failed:\n" + "\n".join(errors)) from err
        results = []
        for rank in range(world_size):
            rec = torch.load(os.path.join(outdir, f"rank{rank}.pt"), weights_only=False)
            results.append(rec["result"])
        return results
