"""The collectives of sequence parallelism: token shards, all-to-all between sequence and head
shards, all-gather of token shards. Shards are contiguous runs of the sequence as
torch.tensor_split makes them (the first N % P ranks hold one token more), so any N works."""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["world", "shard_sizes", "shard_tokens", "gather_tokens", "seq_to_heads", "heads_to_seq", "check_heads"]


def world(group=None) -> tuple[int, int]:
    """(rank, world size) in `group`; (0, 1) without an initialised process group."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sizes(n: int, world_size: int) -> list[int]:
    """Tokens of each rank's shard of an n-token sequence."""
    if n < world_size:
        raise ValueError(f"a sequence of {n} tokens cannot be split over {world_size} ranks")
    return [n // world_size + (1 if r < n % world_size else 0) for r in range(world_size)]


def shard_tokens(x: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """This rank's shard of the full sequence x along `dim` (no communication)."""
    rank, size = world(group)
    sizes = shard_sizes(x.shape[dim], size)
    start = sum(sizes[:rank])
    return x.narrow(dim, start, sizes[rank])


def gather_tokens(x: torch.Tensor, n: int, dim: int = 1, group=None) -> torch.Tensor:
    """The full n-token sequence from every rank's shard x along `dim` (an all-gather)."""
    rank, size = world(group)
    if size == 1:
        return x
    sizes = shard_sizes(n, size)
    if x.shape[dim] != sizes[rank]:
        raise ValueError(f"rank {rank} holds {x.shape[dim]} tokens along dim {dim}; its shard of {n} has {sizes[rank]}")
    x = x.movedim(dim, 0).contiguous()
    # all_gather needs equal shapes on gloo: pad every shard to the largest
    big = sizes[0]
    if x.shape[0] < big:
        x = torch.cat([x, x.new_zeros((big - x.shape[0],) + x.shape[1:])], 0)
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat([p[:s] for p, s in zip(parts, sizes)], 0).movedim(0, dim)


def check_heads(heads: int, world_size: int) -> None:
    if heads % world_size:
        divisors = [p for p in range(1, heads + 1) if heads % p == 0]
        raise ValueError(f"sequence-parallel attention splits heads over ranks: {heads} heads do not divide by a world "
                         f"size of {world_size}; run on {divisors} processes")


def seq_to_heads(x: torch.Tensor, n: int, group=None) -> torch.Tensor:
    """(B, heads, n_rank, D) sequence shard -> (B, heads / P, n, D): this rank's heads over the whole
    sequence (one all-to-all). Rank r gets heads r * heads / P onwards."""
    rank, size = world(group)
    if size == 1:
        return x
    b, heads, local, d = x.shape
    check_heads(heads, size)
    sizes = shard_sizes(n, size)
    if local != sizes[rank]:
        raise ValueError(f"rank {rank} holds {local} tokens; its shard of {n} has {sizes[rank]}")
    h = heads // size
    send = x.reshape(b, size, h, local, d).transpose(0, 1).contiguous()  # (P, B, h, n_rank, D): to rank j, its heads
    recv = x.new_empty(b * h * n * d)
    dist.all_to_all_single(recv, send.reshape(-1), [b * h * s * d for s in sizes], [b * h * local * d] * size,
                           group=group)
    chunks = recv.split([b * h * s * d for s in sizes])
    return torch.cat([c.view(b, h, s, d) for c, s in zip(chunks, sizes)], 2)


def heads_to_seq(y: torch.Tensor, heads: int, group=None) -> torch.Tensor:
    """(B, heads / P, n, D) -> (B, heads, n_rank, D): the inverse of seq_to_heads."""
    rank, size = world(group)
    if size == 1:
        return y
    b, h, n, d = y.shape
    if h * size != heads:
        raise ValueError(f"this rank holds {h} heads; {heads} over {size} ranks are {heads // size} each")
    sizes = shard_sizes(n, size)
    local = sizes[rank]
    send = torch.cat([c.reshape(-1) for c in y.split(sizes, 2)])  # to rank j: its tokens of my heads
    recv = y.new_empty(size * b * h * local * d)
    dist.all_to_all_single(recv, send, [b * h * local * d] * size, [b * h * s * d for s in sizes], group=group)
    return recv.view(size, b, h, local, d).transpose(0, 1).reshape(b, heads, local, d)
