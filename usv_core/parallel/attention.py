"""VSA on a sequence-sharded q, k, v: each rank attends with its heads over the whole grid."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ..attention import vsa_attention, vsa_attention_blocked
from .comm import check_heads, heads_to_seq, seq_to_heads, world

__all__ = ["sequence_parallel_vsa", "local_heads"]


def local_heads(value, heads: int, group=None):
    """This rank's slice of a per-head value: keep ratios (heads,) or (B, heads), a gate
    (B, heads, ...); floats and size-1 head dims pass through."""
    rank, size = world(group)
    if size == 1 or not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    dim = 0 if value.dim() == 1 else 1
    if value.shape[dim] == 1:
        return value
    if value.shape[dim] != heads:
        raise ValueError(f"a per-head value of shape {tuple(value.shape)} does not have {heads} heads along dim {dim}")
    h = heads // size
    return value.narrow(dim, rank * h, h)


def sequence_parallel_vsa(q, k, v, keep, *, grid=None, block_sizes=None, cube=(4, 4, 4), gate=None, scale=None,
                          group=None, return_stats: bool = False, backend: str = "auto"):
    """Video Sparse Attention over sequence shards.

    q, k, v: (B, heads, n_rank, D), this rank's contiguous shard of the raster sequence of `grid`
        (or of a cube-grouped sequence of `block_sizes`, e.g. after token merging); shards as
        usv_core.parallel.shard_sizes cuts them. heads must divide by the world size.
    keep: float, or (heads,) / (B, heads) ratios for all heads (each rank uses its own).
    gate: None, or a tensor shaped like q (a per-token gate, sharded like q).
    Returns this rank's (B, heads, n_rank, D) shard of what vsa_attention returns for the whole
    sequence (and, with return_stats, the (B, heads) coarse entropy of all heads on every rank).
    """
    if (grid is None) == (block_sizes is None):
        raise ValueError("pass exactly one of grid (raster sequence) and block_sizes (cube-grouped sequence)")
    rank, size = world(group)
    b, heads = q.shape[:2]
    check_heads(heads, size)
    n = math.prod(grid) if grid is not None else int(torch.as_tensor(block_sizes).sum())
    if gate is not None and (not isinstance(gate, torch.Tensor) or gate.shape != q.shape):
        raise ValueError("gate must be None or a tensor shaped like q (B, heads, n_rank, D) under sequence parallelism")
    qh, kh, vh = (seq_to_heads(t, n, group) for t in (q, k, v))
    gh = seq_to_heads(gate, n, group) if gate is not None else None
    keep_h = local_heads(keep, heads, group)
    kwargs = dict(gate=gh, scale=scale, return_stats=return_stats, backend=backend)
    if grid is not None:
        res = vsa_attention(qh, kh, vh, grid, keep_h, cube=cube, **kwargs)
    else:
        res = vsa_attention_blocked(qh, kh, vh, block_sizes, keep_h, **kwargs)
    out, ent = res if return_stats else (res, None)
    out = heads_to_seq(out, heads, group)
    if not return_stats:
        return out
    if size > 1:
        # every rank gets every head's entropy, so that a policy decides the same on every rank
        parts = [torch.empty_like(ent) for _ in range(size)]
        dist.all_gather(parts, ent.contiguous(), group=group)
        ent = torch.cat(parts, 1)
    return out, ent
