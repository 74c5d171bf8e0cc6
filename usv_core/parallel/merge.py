"""Token merging under sequence parallelism: one plan, the same on every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..merge import MergePlan, plan_merge
from .comm import gather_tokens, world

__all__ = ["plan_merge_parallel"]


def _fingerprint(plan: MergePlan) -> torch.Tensor:
    """Two int64 numbers that differ, in practice, between two different groupings."""
    idx = plan.dst_index.reshape(-1).to(torch.int64)
    w = torch.arange(1, idx.numel() + 1, device=idx.device, dtype=torch.int64) % 1_000_003
    return torch.stack([idx.sum(), (idx * w).sum()])


def plan_merge_parallel(metric: torch.Tensor, grid, ratio: float, cube=(4, 4, 4), *, group=None,
                        destination_share: float = 0.25, check: bool = True) -> MergePlan:
    """The merging plan of the whole grid from this rank's shard of the metric (B, n_rank, C).

    The shards are gathered (an exact copy, so every rank plans on the same numbers) and each rank
    plans; with `check`, one small all-gather confirms that every rank holds the same grouping and
    raises otherwise. Merge with plan.merge on the gathered sequence and keep this rank's shard of
    the merged one (usv_core.parallel.shard_tokens); attention then runs with
    block_sizes=plan.block_sizes."""
    n = 1
    for g in grid:
        n *= int(g)
    full = gather_tokens(metric, n, dim=1, group=group)
    plan = plan_merge(full, grid, ratio, cube, destination_share=destination_share)
    rank, size = world(group)
    if check and size > 1:
        mine = _fingerprint(plan)
        parts = [torch.empty_like(mine) for _ in range(size)]
        dist.all_gather(parts, mine, group=group)
        if any(not torch.equal(p, parts[0]) for p in parts):
            raise RuntimeError("token merging planned different groupings on different ranks from the same metric "
                               "(non-deterministic kernels?); run with one process or without merging")
    return plan
