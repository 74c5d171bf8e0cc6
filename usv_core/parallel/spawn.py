"""Start a local process group (one process per rank) for tests and CPU smoke runs: gloo on the
CPU, nccl with one GPU per rank."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "spawn"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, fn, world_size, backend, port, args):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    if backend == "gloo":
        torch.set_num_threads(1)  # CPU ranks share the machine's cores
    dist.init_process_group(backend, rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str = "gloo") -> None:
    """Run fn(rank, world_size, *args) in world_size new processes inside one process group; fn
    must be importable by name (a module-level function). Raises if any rank fails."""
    mp.spawn(_entry, args=(fn, world_size, backend, free_port(), args), nprocs=world_size, join=True)
