"""Start a local process group (one process per rank) for tests and CPU smoke runs: gloo on the
CPU, nccl with one GPU per rank."""

from __future__ import annotations

import datetime
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["spawn"]


def _entry(rank, fn, world_size, backend, store, timeout_s, args):
    if backend == "nccl":
        torch.cuda.set_device(rank)
    if backend == "gloo":
        torch.set_num_threads(1)  # CPU ranks share the machine's cores
    # a file store: no port to pick, so no race with other programs for a free one
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str = "gloo", timeout_s: float = 600.0) -> None:
    """Run fn(rank, world_size, *args) in world_size new processes inside one process group; fn
    must be importable by name (a module-level function). Raises if any rank fails. timeout_s:
    how long a collective may wait for the other ranks."""
    with tempfile.TemporaryDirectory(prefix="usv-pg-") as tmp:
        store = os.path.join(tmp, "store")
        mp.spawn(_entry, args=(fn, world_size, backend, store, timeout_s, args), nprocs=world_size, join=True)
