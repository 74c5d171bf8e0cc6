"""torch.distributed for the recipe: one process per GPU under torchrun (NCCL), or processes on the
CPU (gloo, how the tests check the path). Models are sharded with FSDP2 (fully_shard), a block at
a time and then the root, so the same code holds a real Wan checkpoint that one GPU cannot."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as td


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.sharded:
            td.barrier()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on one: decisions to stop are taken together,
        or the others would wait in their next collective forever."""
        if not self.sharded:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        td.all_reduce(t, op=td.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        """Averages logged numbers over processes (each saw its own batch)."""
        if not self.sharded or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=self.device)
        td.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t.tolist())}


def init() -> Dist:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK); a plain run is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    if world <= 1:
        return Dist(device=torch.device("cuda" if cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if cuda else "gloo")
    return Dist(rank=rank, world=world, device=torch.device(f"cuda:{local}" if cuda else "cpu"))


def close(d: Dist) -> None:
    if d.sharded and td.is_initialized():
        td.destroy_process_group()


def checkpoint_blocks(model: torch.nn.Module) -> torch.nn.Module:
    """Keep only each block's input for backward and recompute the rest (before sharding, so that
    FSDP2 wraps the checkpointed blocks). Recomputing a sparse block reuses its call's merge plan
    and selects the same cubes, so gradients are those of the forward that ran."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    blocks = set(model.blocks)
    apply_activation_checkpointing(model, check_fn=lambda m: m in blocks)
    return model


def shard(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """FSDP2 over all processes: each block its own unit (gathered just before it runs, freed after),
    the embeddings and head in the root unit. A single process is left as it is."""
    if not d.sharded:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(d.device.type, (d.world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
