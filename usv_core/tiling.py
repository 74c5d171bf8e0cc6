"""Token grid <-> cube order.

A video latent after patchify is a (T, H, W) grid of tokens stored in raster order (t slowest,
w fastest). Video Sparse Attention groups the tokens into cubes of (ct, ch, cw) that tile the grid
from the origin, so there are ceil(T/ct) x ceil(H/ch) x ceil(W/cw) cubes and the cubes on the far
edges hold fewer real tokens. Cubes are numbered in raster order of the cube grid, and inside a
cube tokens keep their raster order.

Two layouts describe the same grouping:
- compact cube order: the N real tokens grouped cube after cube, no padding (`perm`, `inv_perm`,
  `block_sizes`, `block_starts`); token merging produces sequences in this layout;
- padded token table: (num_cubes, block) raster indices, a block's real tokens first and -1 in
  the slots an edge cube lacks (`token_table`); the kernels read raster-ordered tensors through
  it, so no reorder is needed.

`packed` is the block layout attention runs on by default: runs of neighbouring edge cubes along
w (the one-frame cubes of a 4k+1-frame latent, the two-row cubes of a 30-token height) are joined
into blocks of at most one cube's volume, so a 4x4x4 tiling of Wan's 480p grid (21, 30, 52) has
520 blocks of 63 tokens on average instead of 624 cubes of 52.5: every block the kernels touch is
then a nearly full tile. Full cubes stay blocks of their own; the order stays cube order.

`cube_tiling(grid, cube, device)` builds all of it once per (grid, cube, device) and caches it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = [
    "CubeTiling",
    "check_triple",
    "cube_tiling",
    "blocked_layout",
    "BlockLayout",
    "to_cube_order",
    "from_cube_order",
    "next_block",
    "num_blocks",
]


def next_block(n: int) -> int:
    """Smallest kernel tile (a power of two, at least 16: tensor-core minimum) holding n tokens."""
    return max(16, 1 << max(0, int(n) - 1).bit_length())


@dataclass(frozen=True)
class BlockLayout:
    """How a sequence of N tokens is grouped into blocks (cubes) for block-sparse attention.

    token_table: (num_blocks, block) int32, the sequence index of each slot: the block's
    block_sizes[i] real tokens fill its first slots, -1 pads the rest.
    block_sizes: (num_blocks,) int32, real tokens per block (>= 1).
    block_of_token: (N,) int64, the block each sequence position belongs to.
    """

    num_tokens: int
    num_blocks: int
    block: int
    max_block_size: int
    token_table: torch.Tensor
    block_sizes: torch.Tensor
    block_of_token: torch.Tensor


@dataclass(frozen=True)
class CubeTiling:
    grid: Tuple[int, int, int]
    cube: Tuple[int, int, int]
    cube_grid: Tuple[int, int, int]
    num_cubes: int
    num_tokens: int
    perm: torch.Tensor  # (N,) raster index of the i-th token in compact cube order
    inv_perm: torch.Tensor  # (N,) compact cube-order position of raster token r
    block_sizes: torch.Tensor  # (num_cubes,) int32 real tokens per cube
    block_starts: torch.Tensor  # (num_cubes + 1,) int64 offsets into compact cube order
    layout: BlockLayout  # one block per cube; token_table holds raster indices
    packed: BlockLayout  # edge cubes joined along w (see the module docstring); raster indices too


def check_triple(name, value) -> Tuple[int, int, int]:
    """A (T, H, W)-like argument as three positive ints, or a ValueError naming it."""
    try:
        t = tuple(int(x) for x in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be three positive integers, got {value!r}") from None
    if len(t) != 3 or any(x <= 0 for x in t):
        raise ValueError(f"{name} must be three positive integers, got {value!r}")
    return t


@functools.lru_cache(maxsize=64)
def _cube_tiling_cached(grid, cube, device_str) -> CubeTiling:
    device = torch.device(device_str)
    T, H, W = grid
    ct, ch, cw = cube
    nt, nh, nw = -(-T // ct), -(-H // ch), -(-W // cw)
    num_cubes = nt * nh * nw
    vol = ct * ch * cw
    n = T * H * W

    # Every cube slot (local t, h, w) maps to a raster index, valid where it falls inside the
    # grid. Built on the CPU with integer arithmetic, then moved.
    ci = torch.arange(num_cubes)
    cube_t, cube_h, cube_w = ci // (nh * nw), (ci // nw) % nh, ci % nw
    li = torch.arange(vol)
    lt, lh, lw = li // (ch * cw), (li // cw) % ch, li % cw
    t = cube_t[:, None] * ct + lt[None, :]
    h = cube_h[:, None] * ch + lh[None, :]
    w = cube_w[:, None] * cw + lw[None, :]
    valid = (t < T) & (h < H) & (w < W)
    raster = (t * H + h) * W + w

    # Compact cube order keeps the valid slots in slot order, which is raster order in a cube.
    perm = raster[valid]
    sizes = valid.sum(1)
    starts = torch.zeros(num_cubes + 1, dtype=torch.int64)
    starts[1:] = torch.cumsum(sizes, 0)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(n)

    blk = next_block(vol)
    layout = _grouped_layout(perm, sizes, ci, blk, device)
    packed = _pack_edges(perm, sizes, ci // nw, vol, blk, device)
    return CubeTiling(
        grid=(T, H, W),
        cube=(ct, ch, cw),
        cube_grid=(nt, nh, nw),
        num_cubes=num_cubes,
        num_tokens=n,
        perm=perm.to(device),
        inv_perm=inv_perm.to(device),
        block_sizes=sizes.to(torch.int32).to(device),
        block_starts=starts.to(device),
        layout=layout,
        packed=packed,
    )


def _grouped_layout(perm, sizes, group, blk, device) -> BlockLayout:
    """Blocks made of consecutive cubes (group[c]: cube c's block, non-decreasing), each block's
    tokens in compact cube order (perm: their raster indices) in its first slots."""
    n = perm.numel()
    nb = int(group[-1]) + 1
    psizes = torch.zeros(nb, dtype=torch.int64).index_add_(0, group, sizes)
    tok_group = torch.repeat_interleave(group, sizes)
    starts = torch.cumsum(psizes, 0) - psizes
    slot = torch.arange(n) - starts[tok_group]
    ptable = torch.full((nb, blk), -1, dtype=torch.int64)
    ptable[tok_group, slot] = perm
    block_of_token = torch.empty(n, dtype=torch.int64)
    block_of_token[perm] = tok_group
    return BlockLayout(
        num_tokens=n,
        num_blocks=nb,
        block=blk,
        max_block_size=int(psizes.max()),
        token_table=ptable.to(torch.int32).to(device),
        block_sizes=psizes.to(torch.int32).to(device),
        block_of_token=block_of_token.to(device),
    )


def _pack_edges(perm, sizes, row, vol, blk, device) -> BlockLayout:
    """Join runs of consecutive partial cubes of one cube row (same t and h cube) into blocks of
    at most `vol` tokens, greedily from the row's start. perm: the raster index of every token in
    compact cube order, which the joined blocks keep."""
    group, g, fill, last_row = [], -1, vol, -1
    for s, r in zip(sizes.tolist(), row.tolist()):
        if s == vol or r != last_row or fill + s > vol:
            g, fill = g + 1, 0
        group.append(g)
        fill = vol if s == vol else fill + s
        last_row = r
    return _grouped_layout(perm, sizes, torch.tensor(group), blk, device)


def cube_tiling(grid, cube=(4, 4, 4), device="cpu") -> CubeTiling:
    """The cube tiling of a (T, H, W) grid, cached per (grid, cube, device)."""
    grid = check_triple("grid", grid)
    cube = check_triple("cube", cube)
    return _cube_tiling_cached(grid, cube, str(torch.device(device)))


def blocked_layout(block_sizes: torch.Tensor, device=None) -> BlockLayout:
    """Layout of a sequence already grouped block after block, block i holding block_sizes[i]
    consecutive tokens (the output of token merging).

    Pass the sizes as a CPU tensor where you can (token merging keeps a host copy): the layout is
    then built on the host without a device sync and cached, since a merge ratio on one grid
    always gives the same sizes and every block of a forward shares them."""
    if not isinstance(block_sizes, torch.Tensor) or block_sizes.dim() != 1 or block_sizes.numel() == 0:
        raise ValueError("block_sizes must be a non-empty 1-D integer tensor")
    if block_sizes.dtype.is_floating_point or block_sizes.dtype == torch.bool:
        raise ValueError("block_sizes must be an integer tensor")
    device = torch.device(device) if device is not None else block_sizes.device
    if block_sizes.device.type == "cpu":
        return _blocked_layout_cached(tuple(block_sizes.tolist()), str(device))
    return _build_blocked_layout(block_sizes.to(device=device, dtype=torch.int64), device)


@functools.lru_cache(maxsize=32)
def _blocked_layout_cached(sizes: tuple, device: str) -> BlockLayout:
    host = _build_blocked_layout(torch.tensor(sizes, dtype=torch.int64), torch.device("cpu"))
    if device == "cpu":
        return host
    return BlockLayout(
        num_tokens=host.num_tokens, num_blocks=host.num_blocks, block=host.block,
        max_block_size=host.max_block_size, token_table=host.token_table.to(device),
        block_sizes=host.block_sizes.to(device), block_of_token=host.block_of_token.to(device),
    )


def _build_blocked_layout(sizes: torch.Tensor, device) -> BlockLayout:
    # one host sync on a device tensor: the tile width is a compile-time constant of the kernels
    smax, smin = (int(x) for x in torch.stack([sizes.max(), sizes.min()]).tolist())
    if smin < 1:
        raise ValueError("block_sizes must all be >= 1")
    blk = next_block(smax)
    starts = torch.cumsum(sizes, 0) - sizes
    slot = torch.arange(blk, device=device)
    table = torch.where(slot[None, :] < sizes[:, None], starts[:, None] + slot[None, :], -1)
    nb = sizes.numel()
    block_of_token = torch.repeat_interleave(torch.arange(nb, device=device), sizes)
    return BlockLayout(
        num_tokens=int(block_of_token.numel()),
        num_blocks=nb,
        block=blk,
        max_block_size=smax,
        token_table=table.to(torch.int32),
        block_sizes=sizes.to(torch.int32),
        block_of_token=block_of_token,
    )


def to_cube_order(x: torch.Tensor, grid, cube=(4, 4, 4), dim: int = -2) -> torch.Tensor:
    """Raster -> compact cube order along `dim` (default: the token dim of (B, heads, N, D))."""
    tiling = cube_tiling(grid, cube, x.device)
    return x.index_select(dim, tiling.perm)


def from_cube_order(x: torch.Tensor, grid, cube=(4, 4, 4), dim: int = -2) -> torch.Tensor:
    """Compact cube order -> raster along `dim`; the inverse of to_cube_order."""
    tiling = cube_tiling(grid, cube, x.device)
    return x.index_select(dim, tiling.inv_perm)


def num_cubes(grid, cube=(4, 4, 4)) -> int:
    grid = check_triple("grid", grid)
    cube = check_triple("cube", cube)
    return math.prod(-(-g // c) for g, c in zip(grid, cube))


def num_blocks(grid, cube=(4, 4, 4), pack_edges: bool = True) -> int:
    """Blocks vsa_attention selects among on this grid (keep counts are shares of this)."""
    if not pack_edges:
        return num_cubes(grid, cube)
    return cube_tiling(grid, cube).packed.num_blocks
