"""VSA for joint image-text attention (HunyuanVideo's double and single stream blocks).

The sequence is N = G grid tokens in raster order followed by L text tokens. Semantics, exact:
- image queries attend (softmax) over the real tokens of their kept grid key cubes UNION all
  text keys; selection is VSA's (coarse cube scores among grid cubes only, keep applied to the
  number of grid cubes, ties to the lower cube);
- text queries attend densely to all N keys.

How: one block layout covers the whole sequence without reordering anything. Its first blocks
are the grid cubes (the cube tiling's table of raster indices), then the text in blocks of up to
TEXT_BLOCK consecutive tokens. Each image query cube's list is its selected cubes plus every text
block; the block-sparse kernel (or the PyTorch reference off the GPU) writes the image rows in
place. Text rows are a few hundred queries over all keys: plain scaled_dot_product_attention
serves them, so the kernel lists stay narrow (text query blocks get a one-block dummy list whose
result is discarded).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..tiling import BlockLayout, check_triple, cube_tiling, next_block
from . import ops
from .api import _check_qkv, _keep_counts, _last_dim_contiguous, _resolve_backend, vsa_attention
from .reference import block_sparse_reference, coarse_entropy, coarse_scores, select_blocks

__all__ = ["vsa_attention_joint", "joint_layout", "TEXT_BLOCK"]

TEXT_BLOCK = 64  # text tokens per block: the kernels' tile for the 64-token cubes


@functools.lru_cache(maxsize=32)
def _joint_layout_cached(grid, cube, text, device_str) -> BlockLayout:
    tiling = cube_tiling(grid, cube, "cpu")
    G, C = tiling.num_tokens, tiling.num_cubes
    nt = -(-text // TEXT_BLOCK)
    sizes_t = torch.clamp(text - torch.arange(nt) * TEXT_BLOCK, max=TEXT_BLOCK)
    sizes = torch.cat([tiling.block_sizes.long(), sizes_t])
    # at least the tiling's tile, whose table is copied in (edge cubes may all be smaller)
    blk = max(tiling.layout.block, next_block(int(sizes.max())))
    grid_tab = torch.full((C, blk), -1, dtype=torch.int64)
    grid_tab[:, : tiling.layout.block] = tiling.layout.token_table.long()
    slot = torch.arange(blk)
    text_tab = G + torch.arange(nt)[:, None] * TEXT_BLOCK + slot[None, :]
    text_tab = torch.where(slot[None, :] < sizes_t[:, None], text_tab, -1)
    bot = torch.cat([tiling.layout.block_of_token, C + torch.arange(text) // TEXT_BLOCK])
    device = torch.device(device_str)
    return BlockLayout(
        num_tokens=G + text, num_blocks=C + nt, block=blk, max_block_size=int(sizes.max()),
        token_table=torch.cat([grid_tab, text_tab]).to(torch.int32).to(device),
        block_sizes=sizes.to(torch.int32).to(device), block_of_token=bot.to(device),
    )


def joint_layout(grid, cube, text: int, device="cpu") -> BlockLayout:
    """Blocks of a grid (raster order) followed by `text` tokens: grid cubes first, then text
    blocks of up to TEXT_BLOCK tokens; the token table holds sequence indices. Cached."""
    g = tuple(int(x) for x in grid)
    c = tuple(int(x) for x in cube)
    return _joint_layout_cached(g, c, int(text), str(torch.device(device)))


def _joint_lists(idx, cnt, num_cubes: int, num_text_blocks: int):
    """Grid-cube lists (B, H, C, kmax) -> lists over all C + nt query blocks, width kmax + nt.

    Image query cube rows: their selected cubes, then every text block (still ascending).
    Text query rows: a dummy list (their own block) the caller overwrites."""
    B, H, C, kmax = idx.shape
    nt = num_text_blocks
    width = kmax + nt
    dev = idx.device
    slot = torch.arange(width, device=dev)
    cnt_l = cnt.long()[..., None]
    grid_part = F.pad(idx.long(), (0, nt), value=-1)
    text_pos = slot - cnt_l  # position among the text blocks, once past the selected cubes
    text_part = torch.where(text_pos < nt, num_cubes + text_pos, torch.full_like(text_pos, -1))
    img_idx = torch.where(slot < cnt_l, grid_part, text_part)
    img_cnt = cnt.long() + nt
    txt_idx = torch.full((B, H, nt, width), -1, dtype=torch.long, device=dev)
    txt_idx[..., 0] = num_cubes + torch.arange(nt, device=dev)
    txt_cnt = torch.ones((B, H, nt), dtype=torch.long, device=dev)
    block_index = torch.cat([img_idx, txt_idx], 2).to(torch.int32).contiguous()
    block_count = torch.cat([img_cnt, txt_cnt], 2).to(torch.int32).contiguous()
    return block_index, block_count


def vsa_attention_joint(q, k, v, grid, keep, cube=(4, 4, 4), text_tokens=None, scale=None, *,
                        return_stats: bool = False, backend: str = "auto"):
    """VSA over a (T, H, W) grid whose N = T*H*W tokens (raster order) are followed by
    `text_tokens` text tokens; q, k, v are (B, heads, N + text_tokens, D).

    Image queries: exact softmax over their kept grid cubes (VSA selection among grid cubes,
    `keep` a float or (heads,) / (B, heads) tensor of ratios of the grid cubes) and all text keys.
    Text queries: dense over all keys. keep=1 is dense attention. text_tokens=None takes the
    tokens past the grid; 0 is plain vsa_attention.
    return_stats: also return h (B, heads), the normalised entropy of the grid-cube coarse attention.
    Returns (B, heads, N + text_tokens, D) in the input order (and h when return_stats).
    """
    _check_qkv(q, k, v)
    g = check_triple("grid", grid)
    G, N = math.prod(g), q.shape[2]
    L = N - G if text_tokens is None else int(text_tokens)
    if L < 0 or G + L != N:
        raise ValueError(f"grid {g} holds {G} tokens and text_tokens={text_tokens} but q has N={N}")
    if L == 0:
        return vsa_attention(q, k, v, g, keep, cube=cube, scale=scale, return_stats=return_stats, backend=backend)

    B, H, _, D = q.shape
    scale = D ** -0.5 if scale is None else float(scale)
    tiling = cube_tiling(g, cube, q.device)
    layout = joint_layout(g, tiling.cube, L, q.device)
    C, nt = tiling.num_cubes, layout.num_blocks - tiling.num_cubes
    counts, kmax = _keep_counts(keep, B, H, C, q.device)

    if _resolve_backend(backend, q, layout.block) == "reference":
        scores = coarse_scores(q[:, :, :G], k[:, :, :G], tiling.layout, scale)
        idx, cnt = select_blocks(scores, counts)
        ent = coarse_entropy(scores) if return_stats else None
        block_index, block_count = _joint_lists(idx, cnt, C, nt)
        out = block_sparse_reference(q, k, v, block_index, block_count, layout, scale)
    else:
        q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
        # the grid tiling's table only names raster indices < G: selection never reads text rows
        idx, cnt, _, ent, _, _ = ops.select(
            q.detach(), k.detach(), v.detach(), tiling.layout.token_table, tiling.layout.block_sizes,
            counts.view(-1), kmax, tiling.layout.block, True, scale, False, return_stats,
        )
        ent = ops.entropy_from_blocks(ent, C) if return_stats else None
        block_index, block_count = _joint_lists(idx, cnt, C, nt)
        out = ops.attend(q, k, v, block_index, block_count, layout.token_table, layout.block_sizes,
                         layout.block, True, scale)
    text = F.scaled_dot_product_attention(q[:, :, G:], k, v, scale=scale)
    out = torch.cat([out[:, :, :G], text.to(out.dtype)], 2)
    if return_stats:
        return out, ent
    return out
