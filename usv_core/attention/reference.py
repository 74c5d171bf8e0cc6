"""Video Sparse Attention in plain PyTorch: the definition the Triton kernels must reproduce.

Runs on any device and in float32, bfloat16 and float16; arithmetic is float32 throughout and
the result is cast back to the input dtype. Everything works on a `BlockLayout` (usv_core.tiling):
which block (cube) every sequence position belongs to and how many real tokens each block has,
so one code path serves raster-ordered grids and cube-grouped (merged) sequences alike.

Steps, per (batch, head):
1. coarse: q, k, v averaged over the real tokens of each block;
2. scores = q_c k_c^T * scale, (num_blocks x num_blocks), float32;
3. selection: each query block keeps its `count` highest-scoring key blocks (ties go to the lower
   block index), listed in ascending block order;
4. fine: every query token attends (softmax) to all real tokens of its kept key blocks;
5. optional gate: out = fine + gate * coarse, coarse = softmax(scores) @ v_c copied to every
   token of the query block;
6. optional stats: the normalised entropy of softmax(scores), averaged over query blocks.
"""

from __future__ import annotations

import math

import torch

from ..tiling import BlockLayout

__all__ = [
    "pool_blocks",
    "coarse_scores",
    "select_blocks",
    "block_mask_from_lists",
    "block_sparse_reference",
    "coarse_entropy",
    "vsa_reference",
]

# queries per chunk in the fine stage: bounds the (chunk x N) float32 score matrix in memory
_QUERY_CHUNK = 2048


def pool_blocks(x: torch.Tensor, layout: BlockLayout) -> torch.Tensor:
    """(B, heads, N, D) -> (B, heads, num_blocks, D) float32 means over each block's real tokens."""
    B, H, _, D = x.shape
    sums = x.new_zeros((B, H, layout.num_blocks, D), dtype=torch.float32)
    sums = sums.index_add(2, layout.block_of_token.to(x.device), x.float())
    return sums / layout.block_sizes.to(device=x.device, dtype=torch.float32)[:, None]


def coarse_scores(q: torch.Tensor, k: torch.Tensor, layout: BlockLayout, scale: float) -> torch.Tensor:
    qc, kc = pool_blocks(q, layout), pool_blocks(k, layout)
    return torch.matmul(qc, kc.transpose(-1, -2)) * scale


def select_blocks(scores: torch.Tensor, counts: torch.Tensor):
    """Top-`counts[b, h]` key blocks of every score row.

    scores: (B, heads, Cq, Ck) float; counts: (B, heads) integers in [1, Ck].
    Returns (block_index (B, heads, Cq, kmax) int32 ascending, -1 past the count;
             block_count (B, heads, Cq) int32).
    """
    B, H, Cq, Ck = scores.shape
    counts = counts.to(device=scores.device, dtype=torch.int64).expand(B, H)
    kmax = int(counts.max())
    # a stable descending sort ranks equal scores by ascending index: ties go to the lower block
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(Ck, device=scores.device).expand_as(order))
    chosen = rank < counts[:, :, None, None]
    # ascending block order: chosen indices first, in index order
    idx = torch.argsort((~chosen).to(torch.uint8), dim=-1, stable=True)[..., :kmax]
    cnt = chosen.sum(-1)
    slot = torch.arange(kmax, device=scores.device)
    idx = torch.where(slot < cnt[..., None], idx, torch.full_like(idx, -1))
    return idx.to(torch.int32), cnt.to(torch.int32)


def block_mask_from_lists(block_index: torch.Tensor, block_count: torch.Tensor, num_key_blocks: int):
    """Lists -> dense (B, heads, Cq, Ck) bool mask; entries past each count are ignored."""
    kmax = block_index.shape[-1]
    slot = torch.arange(kmax, device=block_index.device)
    valid = slot < block_count[..., None].long()
    col = torch.where(valid, block_index.long(), torch.full_like(block_index, num_key_blocks).long())
    mask = torch.zeros(*block_index.shape[:-1], num_key_blocks + 1, dtype=torch.bool, device=block_index.device)
    mask.scatter_(-1, col, True)
    return mask[..., :num_key_blocks]


def block_sparse_reference(q, k, v, block_index, block_count, layout: BlockLayout, scale: float):
    """Exact softmax attention of every query token over the real tokens of its listed key blocks.

    q, k, v: (B, heads, N, D) in the layout's sequence order. Differentiable.
    """
    B, H, N, D = q.shape
    bot = layout.block_of_token.to(q.device)
    mask = block_mask_from_lists(block_index, block_count, layout.num_blocks)
    rows = []
    for b in range(B):
        heads = []
        for h in range(H):
            kf, vf = k[b, h].float(), v[b, h].float()
            chunks = []
            for s in range(0, N, _QUERY_CHUNK):
                e = min(N, s + _QUERY_CHUNK)
                qf = q[b, h, s:e].float()
                allowed = mask[b, h][bot[s:e, None], bot[None, :]]
                logits = (qf @ kf.T) * scale
                logits = logits.masked_fill(~allowed, float("-inf"))
                chunks.append(torch.softmax(logits, dim=-1) @ vf)
            heads.append(torch.cat(chunks, 0))
        rows.append(torch.stack(heads, 0))
    return torch.stack(rows, 0).to(q.dtype)


def coarse_entropy(scores: torch.Tensor) -> torch.Tensor:
    """Normalised entropy in [0, 1] of softmax(scores) per (B, heads), averaged over query blocks."""
    C = scores.shape[-1]
    if C <= 1:
        return scores.new_zeros(scores.shape[:2], dtype=torch.float32)
    logp = torch.log_softmax(scores.float(), dim=-1)
    ent = -(logp.exp() * logp).nan_to_num(0.0).sum(-1)
    return (ent / math.log(C)).mean(-1)


def vsa_reference(q, k, v, layout: BlockLayout, counts: torch.Tensor, gate=None, scale=None,
                  return_stats: bool = False):
    """The whole of VSA on one layout; `counts` (B, heads) key blocks kept per query block."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    scores = coarse_scores(q, k, layout, scale)
    block_index, block_count = select_blocks(scores, counts)
    out = block_sparse_reference(q, k, v, block_index, block_count, layout, scale)
    if gate is not None:
        vc = pool_blocks(v, layout)
        coarse = torch.softmax(scores, dim=-1) @ vc
        coarse_tok = coarse[:, :, layout.block_of_token.to(q.device)]
        out = (out + gate * coarse_tok.to(out.dtype)).to(q.dtype)
    if return_stats:
        return out, coarse_entropy(scores)
    return out
