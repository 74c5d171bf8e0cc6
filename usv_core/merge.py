"""Cube-local token merging: plans, merge, unmerge and the positions merged tokens stand for.

A plan is built once from a similarity metric (keys or normalised hidden states) and then applied
to any tensor laid out like the metric: `merge` before a transformer block shrinks (B, N, C) to
(B, M, C) group means, `unmerge` after it copies each merged token back to every member.

Matching is bipartite soft matching (ToMe) run independently inside every cube of the VSA tiling,
so a group never leaves its cube and the merged sequence is itself grouped cube after cube:
block-sparse attention runs on it directly with `plan.block_sizes` as its block sizes.

Inside a cube of n tokens that must drop r of them (keeping k = n - r):
- destinations: the first D = clamp(ceil(destination_share * n), 1, k) tokens of a fixed,
  spatially spread priority order (for a 4x4x4 cube the first 16 are the body-centred lattice:
  one token per 2x2 patch in every frame); the remaining tokens are sources;
- every source picks its most similar destination (cosine);
- the r sources with the highest best-similarity merge into their destination, the other
  sources stay alone. D <= k guarantees there are enough sources.
Merged tokens of a cube are ordered by the raster index of their representative (the destination,
or the source itself when it stayed alone); `plan.positions` holds that raster index, which is
what RoPE frequencies are gathered with.

Per-cube counts depend only on the tiling and the ratio, never on the data, so every batch element
keeps the same number of tokens per cube: M and `block_sizes` are shared by the batch while the
groups themselves (dst_index, positions, sizes) are per batch element.

Plans compose: a plan built with `prior=` on an already merged sequence weights every input token
by how many original tokens it stands for (`prior.sizes`), so merging twice gives the exact group
means of the original tokens, and positions stay raster indices of the original grid.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Tuple

import torch

from .tiling import check_triple, cube_tiling

__all__ = ["MergePlan", "plan_merge", "MAX_RATIO"]

MAX_RATIO = 0.9

# Order in which the 8 corners of a 2x2x2 cell become destinations, as (t, h, w) bit triples
# t*4 + h*2 + w: each next corner is far from those already taken (000, then its opposite 111,
# then the opposite pair 011/100, ...), so any prefix of the priority order is spread out.
_CORNER_RANK = torch.tensor([0, 7, 5, 2, 3, 4, 6, 1])  # rank of corner c (inverse of 0,7,3,4,5,2,6,1)


def _destination_priority(pos: torch.Tensor, grid, cube) -> torch.Tensor:
    """Priority (lower = becomes a destination first) of the tokens at raster indices `pos`,
    from their local coordinates inside their cube.

    The key reads the local coordinates bit by bit from the lowest bit up: level 0 splits a cube
    into the 8 interleaved stride-2 sub-lattices, level 1 into stride-4 ones, and so on; at each
    level the 8 corners are ranked by _CORNER_RANK. Tokens of one cube have distinct keys.
    """
    T, H, W = grid
    ct, ch, cw = cube
    t, h, w = pos // (H * W), (pos // W) % H, pos % W
    lt, lh, lw = t % ct, h % ch, w % cw
    levels = max(1, max(c - 1 for c in cube).bit_length())
    rank = _CORNER_RANK.to(pos.device)
    key = torch.zeros_like(pos)
    for level in range(levels):  # most significant digit first
        corner = ((lt >> level) & 1) * 4 + ((lh >> level) & 1) * 2 + ((lw >> level) & 1)
        key = key * 8 + rank[corner]
    return key


def _removed_per_cube(sizes: torch.Tensor, ratio: float) -> torch.Tensor:
    """Tokens each cube removes: ratio * n_c rounded by largest remainder so that the total is
    round(ratio * N), each cube keeping at least one token. CPU int64 in, CPU int64 out."""
    ideal = sizes.double() * ratio
    removed = ideal.floor().long()  # floor(ratio * n) <= n - 1 for ratio < 1
    need = int(round(ratio * int(sizes.sum()))) - int(removed.sum())
    if need > 0:
        frac = torch.where(removed < sizes - 1, ideal - removed, torch.full_like(ideal, -1.0))
        # stable sort: equal remainders go to the lower cube index first
        order = torch.sort(frac, descending=True, stable=True).indices[:need]
        order = order[frac[order] >= 0]  # cubes already at one token cannot give more
        removed[order] += 1
    return removed


class _Budget(NamedTuple):
    """Per-cube counts for one (counts, ratio, destination share): shape-only, so cached and kept
    on the device; planning then never waits for the GPU."""

    num_merged: int
    d_max: int
    k_max: int
    compact: torch.Tensor  # (M,) row of each merged token in the padded (nc * k_max) cube output
    kept_host: torch.Tensor  # (nc,) CPU int64, merged tokens per cube
    block_sizes: torch.Tensor  # (nc,) int32 on the device
    kept_starts: torch.Tensor  # (nc, 1) first output index of each cube
    starts: torch.Tensor  # (nc,) first input index of each cube (input grouped by cube)
    real: torch.Tensor  # (nc, V) slot holds a token
    is_source: torch.Tensor  # (nc, V) slot holds a source
    takes: torch.Tensor  # (nc, V) slot rank < removed: the top-ranked sources merge
    bad_column: torch.Tensor  # (nc, 1, Dmax) destination column unused in this cube


@functools.lru_cache(maxsize=64)
def _budget(counts: Tuple[int, ...], ratio: float, destination_share: float, device_str) -> _Budget:
    device = torch.device(device_str)
    counts = torch.tensor(counts, dtype=torch.int64)
    removed = _removed_per_cube(counts, ratio)
    kept = counts - removed
    n_dst = torch.minimum(torch.clamp((counts.double() * destination_share).ceil().long(), min=1), kept)
    slot = torch.arange(int(counts.max()))
    d_max, k_max = int(n_dst.max()), int(kept.max())
    compact = (torch.arange(k_max) < kept[:, None]).flatten().nonzero().flatten()
    return _Budget(
        num_merged=int(kept.sum()),
        d_max=d_max,
        k_max=k_max,
        compact=compact.to(device),
        kept_host=kept,
        block_sizes=kept.to(device, torch.int32),
        kept_starts=(torch.cumsum(kept, 0) - kept)[:, None].to(device),
        starts=(torch.cumsum(counts, 0) - counts).to(device),
        real=(slot < counts[:, None]).to(device),
        is_source=((slot >= n_dst[:, None]) & (slot < counts[:, None])).to(device),
        takes=(slot < removed[:, None]).to(device),
        bad_column=(torch.arange(d_max) >= n_dst[:, None])[:, None, :].to(device),
    )


@functools.lru_cache(maxsize=16)
def _raster_slots(grid, cube, device_str):
    """Padded (1, num_cubes, V) table of raster indices, each cube's tokens sorted by destination
    priority, padding = N; and per-cube token counts (CPU). Cached: it depends on shapes only."""
    tiling = cube_tiling(grid, cube, device_str)
    device = torch.device(device_str)
    n = tiling.num_tokens
    pos = torch.arange(n, device=device)[None]
    counts = tiling.block_sizes.to("cpu", torch.int64)
    starts = (torch.cumsum(counts, 0) - counts).to(device)
    slots = _slot_table(pos, tiling.layout.block_of_token[None], starts, int(counts.max()), grid, cube)
    return slots, counts


def _slot_table(pos, cube_of, starts, v, grid, cube) -> torch.Tensor:
    """(Bp, num_cubes, V) indices into the input sequence, cube by cube, sorted by destination
    priority; V = max tokens per cube, padding slots hold L (one past the last token).
    starts: (num_cubes,) first index of each cube in the cube-grouped order, on pos's device."""
    bp, length = pos.shape
    nc = starts.numel()
    levels = max(1, max(c - 1 for c in cube).bit_length())
    key = cube_of * (8**levels) + _destination_priority(pos, grid, cube)
    order = torch.argsort(key, dim=1)  # input indices grouped by cube, by priority inside
    cube_sorted = cube_of.gather(1, order)
    slot = torch.arange(length, device=pos.device)[None] - starts[cube_sorted]
    table = torch.full((bp, nc * v), length, dtype=torch.int64, device=pos.device)
    table.scatter_(1, cube_sorted * v + slot, order)
    return table.view(bp, nc, v)


@dataclass(frozen=True)
class MergePlan:
    """How L input tokens (raster order, or the output of a prior plan) merge into M tokens.

    dst_index: (B, L) int64, the merged token each input token goes to.
    sizes: (B, M) float32, original tokens each merged token stands for (sums to T*H*W).
    positions: (B, M) int64, raster index of each merged token's representative; within a cube
        increasing, cubes in raster order of cubes. Gather RoPE frequencies with it (`gather`).
    block_sizes: (num_cubes,) int32, merged tokens per cube (>= 1), shared by the batch.
    block_sizes_host: the same as a CPU int64 tensor, readable without a device sync.
    cube_ordered: whether the output sequence is grouped cube after cube (False only for an
        identity plan over a raster sequence, whose output is that raster sequence).
    """

    grid: Tuple[int, int, int]
    cube: Tuple[int, int, int]
    ratio: float
    num_tokens: int
    num_merged: int
    dst_index: torch.Tensor
    sizes: torch.Tensor
    positions: torch.Tensor
    block_sizes: torch.Tensor
    block_sizes_host: torch.Tensor
    is_identity: bool
    cube_ordered: bool
    # Merge runs as one small matmul per cube (no atomics): gather x into (B, nc, V, C) cube
    # slots, multiply by (B, nc, k_max, V) member weights (input size / group size, cast to x's
    # dtype: in bf16 a weight is off by at most 2^-9 relative), keep the real output rows.
    cube_slots: Optional[torch.Tensor] = field(default=None, repr=False)  # (Bp, nc, V) input index
    cube_weights: Optional[torch.Tensor] = field(default=None, repr=False)  # (B, nc, k_max, V) f32
    compact: Optional[torch.Tensor] = field(default=None, repr=False)  # (M,)
    _weights_by_dtype: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch(self) -> int:
        return self.dst_index.shape[0]

    def _flat_index(self, batch: int) -> torch.Tensor:
        """dst_index flattened over (batch, token) into rows of a (batch * M, C) matrix."""
        if self.batch != batch and self.batch != 1:
            raise ValueError(f"x has batch {batch}, the plan was built for batch {self.batch}")
        idx = self.dst_index.expand(batch, -1)
        offsets = torch.arange(batch, device=idx.device)[:, None] * self.num_merged
        return (idx + offsets).reshape(-1)

    def _check_tokens(self, name, x, expected):
        if not isinstance(x, torch.Tensor) or x.dim() < 3 or x.shape[1] != expected:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name} must be (B, {expected}, C, ...), got {shape}")

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, C, ...) -> (B, M, C, ...): size-weighted mean of each group, in x's dtype
        (accumulated in float32). Trailing dims are features (e.g. Wan 2.2's per-token
        modulation (B, L, 6, C)). An identity plan returns x itself."""
        self._check_tokens("x", x, self.num_tokens)
        if self.is_identity:
            return x
        b, n = x.shape[:2]
        c = math.prod(x.shape[2:])
        if self.batch != b and self.batch != 1:
            raise ValueError(f"x has batch {b}, the plan was built for batch {self.batch}")
        bp, nc, v = self.cube_slots.shape
        dtype = x.dtype
        if x.device.type == "cpu" and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32  # CPU half matmuls are slow
        weights = self._weights_by_dtype.get(dtype)
        if weights is None:
            weights = self._weights_by_dtype.setdefault(dtype, self.cube_weights.to(dtype))
        rows = self.cube_slots.expand(b, nc, v) + torch.arange(b, device=x.device)[:, None, None] * n
        cubes = x.reshape(b * n, c).index_select(0, rows.reshape(-1)).view(b, nc, v, c)
        means = torch.matmul(weights, cubes.to(dtype))  # (b, nc, k_max, c)
        out = means.view(b, -1, c).index_select(1, self.compact).to(x.dtype)
        return out.view(b, self.num_merged, *x.shape[2:])

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """(B, M, C, ...) -> (B, L, C, ...): every input token gets the value of its merged
        token. An identity plan returns y itself."""
        self._check_tokens("y", y, self.num_merged)
        if self.is_identity:
            return y
        b, m = y.shape[:2]
        flat = y.reshape(b * m, -1).index_select(0, self._flat_index(b))
        return flat.view(b, self.num_tokens, *y.shape[2:])

    def unmerge_update(self, x: torch.Tensor, merged_in: torch.Tensor, merged_out: torch.Tensor) -> torch.Tensor:
        """x + unmerge(merged_out - merged_in): what a residual block wrapped with merging should
        return. merged_in = merge(x) went into the block, merged_out came out; every token keeps
        its own residual and only the block's update is shared by the group (returning
        unmerge(merged_out) would flatten each group to one value)."""
        self._check_tokens("x", x, self.num_tokens)
        if self.is_identity:
            return x + (merged_out - merged_in)
        return x + self.unmerge(merged_out - merged_in)

    def gather(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """Pick, along `dim`, the entries of a tensor indexed by original raster position (e.g.
        RoPE frequencies (1 or B, N, ...)) at `positions`: (Bt, N, ...) -> (B, M, ...). Dim 0 is
        the batch (size 1 broadcasts). An identity plan over a raster sequence returns t."""
        if self.is_identity and not self.cube_ordered:
            return t
        dim = dim % t.dim()
        if dim == 0:
            raise ValueError("dim must be the token dimension, not the batch dimension 0")
        b, m = self.positions.shape
        moved = t.movedim(dim, 1)
        bt, n = moved.shape[:2]
        rest = moved.shape[2:]
        if bt == 1:
            out = moved[0].index_select(0, self.positions.reshape(-1)).view(b, m, *rest)
        elif bt == b:
            idx = (self.positions + torch.arange(b, device=t.device)[:, None] * n).reshape(-1)
            out = moved.reshape(bt * n, *rest).index_select(0, idx).view(b, m, *rest)
        else:
            raise ValueError(f"t has batch {bt}, the plan has batch {b}")
        return out.movedim(1, dim)

    def representatives(self) -> torch.Tensor:
        """(B, L): the raster index each input token is represented by after merging."""
        return self.positions.gather(1, self.dst_index)

    def similarity_to(self, other: "MergePlan") -> float:
        """Share of input tokens (over the batch) that keep the same representative in both
        plans: 1.0 for identical groupings; 1 - similarity is the share whose group changed.
        Cheap enough to decide every step whether a cached plan can be reused."""
        if not isinstance(other, MergePlan):
            raise ValueError("other must be a MergePlan")
        if (self.grid, self.num_tokens) != (other.grid, other.num_tokens):
            raise ValueError("other must be a plan over the same grid and input length")
        a, b = self.representatives(), other.representatives()
        if a.shape[0] != b.shape[0]:
            a, b = torch.broadcast_tensors(a, b)
        return float((a == b).float().mean())


def _identity_plan(grid, cube, pos, weight, counts, cube_ordered, device) -> MergePlan:
    b, n = weight.shape
    return MergePlan(
        grid=grid, cube=cube, ratio=0.0, num_tokens=n, num_merged=n,
        dst_index=torch.arange(n, device=device).expand(b, n),
        sizes=weight, positions=pos.expand(b, n), block_sizes=counts.to(device, torch.int32),
        block_sizes_host=counts,
        is_identity=True, cube_ordered=cube_ordered,
    )


def plan_merge(
    metric: torch.Tensor,
    grid,
    ratio: float,
    cube=(4, 4, 4),
    *,
    prior: Optional[MergePlan] = None,
    destination_share: float = 0.25,
) -> MergePlan:
    """Plan cube-local token merging from a similarity metric.

    metric: (B, L, C), any float dtype and device; cosine similarity is used. Without `prior`,
        L = T*H*W in raster order of `grid`; with `prior`, L = prior.num_merged and the tokens
        are prior's merged sequence (e.g. keys computed on it).
    grid: (T, H, W) token grid; cube: (ct, ch, cw) VSA cube, tiling the grid from the origin.
    ratio: share of the L input tokens removed, in [0, 0.9]; 0 gives an identity plan.
    prior: the plan that produced the input sequence; sizes then compose (see module doc).
    destination_share: share of each cube's tokens offered as destinations (capped by the kept
        count, at least 1); 0.25 is one per 2x2 patch per frame.
    """
    if not isinstance(metric, torch.Tensor) or metric.dim() != 3:
        shape = tuple(metric.shape) if isinstance(metric, torch.Tensor) else type(metric).__name__
        raise ValueError(f"metric must be a 3-D tensor (B, N, C), got {shape}")
    if not metric.is_floating_point():
        raise ValueError(f"metric must be a floating-point tensor, got {metric.dtype}")
    grid = check_triple("grid", grid)
    cube = check_triple("cube", cube)
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        raise ValueError(f"ratio must be a number in [0, {MAX_RATIO}], got {ratio!r}") from None
    if not 0.0 <= ratio <= MAX_RATIO:
        raise ValueError(f"ratio must be in [0, {MAX_RATIO}], got {ratio}")
    if not 0.0 < float(destination_share) <= 1.0:
        raise ValueError(f"destination_share must be in (0, 1], got {destination_share}")
    b, length, _ = metric.shape
    device = metric.device
    n_grid = math.prod(grid)

    if prior is None:
        if length != n_grid:
            raise ValueError(f"grid {grid} holds {n_grid} tokens but metric has N = {length}")
        slots, counts = _raster_slots(grid, cube, str(device))
        pos = torch.arange(length, device=device)[None]
        weight = torch.ones(b, length, device=device)
        if ratio == 0.0:
            return _identity_plan(grid, cube, pos, weight, counts, False, device)
    else:
        if not isinstance(prior, MergePlan):
            raise ValueError("prior must be a MergePlan")
        if prior.grid != grid or prior.cube != cube:
            raise ValueError(f"prior was built for grid {prior.grid}, cube {prior.cube}; got {grid}, {cube}")
        if length != prior.num_merged:
            raise ValueError(f"metric has N = {length} but prior merges to {prior.num_merged} tokens")
        if prior.batch not in (1, b):
            raise ValueError(f"metric has batch {b}, prior was built for batch {prior.batch}")
        pos = prior.positions.to(device)
        weight = prior.sizes.to(device).float().expand(b, -1)
        if ratio == 0.0:
            counts = prior.block_sizes_host
            return _identity_plan(grid, cube, pos, weight, counts, prior.cube_ordered, device)
        tiling = cube_tiling(grid, cube, device)
        cube_of = tiling.layout.block_of_token[pos]
        counts = prior.block_sizes_host

    budget = _budget(tuple(counts.tolist()), ratio, float(destination_share), str(device))
    if prior is not None:
        slots = _slot_table(pos, cube_of, budget.starts, int(counts.max()), grid, cube)
    num_merged, d_max = budget.num_merged, budget.d_max
    nc, v = slots.shape[1], slots.shape[2]

    # Padding slots read token 0: they are never sources nor destinations, masks drop them.
    # Raw dot products divided by the norms afterwards: no normalised copy of the metric.
    rows = torch.where(slots < length, slots, 0) + torch.arange(b, device=device)[:, None, None] * length
    cubes = metric.reshape(b * length, -1).index_select(0, rows.reshape(-1)).view(b, nc, v, -1)
    if device.type == "cpu" and cubes.dtype in (torch.float16, torch.bfloat16):
        cubes = cubes.float()  # CPU half matmuls are slow; GPUs accumulate in float32 anyway
    scores = torch.matmul(cubes, cubes[:, :, :d_max].transpose(-1, -2)).float()
    norm = torch.linalg.vector_norm(metric, dim=-1, dtype=torch.float32).reshape(-1)
    inv_norm = 1.0 / norm.index_select(0, rows.reshape(-1)).view(b, nc, v).clamp_min(1e-12)
    scores = scores * inv_norm[..., None] * inv_norm[:, :, None, :d_max]
    slot = torch.arange(v, device=device)
    scores.masked_fill_(budget.bad_column, -math.inf)
    best, best_dst = scores.max(-1)  # (B, nc, V)
    best = best.masked_fill(~budget.is_source, -math.inf)

    # The r most similar sources of each cube merge; D <= k leaves at least r sources.
    ranked = torch.argsort(best, dim=-1, descending=True)
    merged = torch.zeros(b, nc, v, dtype=torch.bool, device=device)
    merged.scatter_(-1, ranked, budget.takes.expand(b, nc, v))

    # Output order: cube by cube, then raster index of the representative.
    slot_pos = torch.cat([pos, pos.new_full((pos.shape[0], 1), n_grid)], 1).gather(1, slots.view(pos.shape[0], -1))
    slot_pos = slot_pos.view(-1, nc, v).expand(b, nc, v)
    keep = ~merged & budget.real
    by_pos = torch.argsort(torch.where(keep, slot_pos, n_grid + 1), dim=-1)
    rank = torch.empty_like(by_pos).scatter_(-1, by_pos, slot.expand(b, nc, v))
    out_of_slot = budget.kept_starts + rank  # valid where keep
    out_local = rank.gather(-1, torch.where(merged, best_dst, slot))  # group's row in its cube
    out_idx = budget.kept_starts + out_local

    dst_index = torch.zeros(b, length + 1, dtype=torch.int64, device=device)
    dst_index.scatter_(1, slots.reshape(slots.shape[0], -1).expand(b, -1), out_idx.reshape(b, -1))
    dst_index = dst_index[:, :length].contiguous()  # column L collected the padding slots
    positions = torch.zeros(b, num_merged + 1, dtype=torch.int64, device=device)
    positions.scatter_(1, torch.where(keep, out_of_slot, num_merged).reshape(b, -1), slot_pos.reshape(b, -1))
    positions = positions[:, :num_merged].contiguous()
    sizes = torch.zeros(b, num_merged, device=device).scatter_add_(1, dst_index, weight)

    # Member weights per cube; padding slots weigh 0 and read their cube's first token, so that
    # a non-finite value cannot leak into other cubes.
    token_weight = weight / sizes.gather(1, dst_index)
    slot_weight = torch.cat([token_weight, weight.new_zeros(b, 1)], 1)
    slot_weight = slot_weight.gather(1, slots.reshape(slots.shape[0], -1).expand(b, -1))
    cube_weights = torch.zeros(b, nc, budget.k_max, v, device=device)
    cube_weights.scatter_(2, out_local.clamp_max(budget.k_max - 1)[:, :, None, :], slot_weight.view(b, nc, 1, v))
    cube_slots = torch.where(slots < length, slots, slots[..., :1])
    return MergePlan(
        grid=grid, cube=cube, ratio=ratio, num_tokens=length, num_merged=num_merged,
        dst_index=dst_index, sizes=sizes, positions=positions, block_sizes=budget.block_sizes,
        block_sizes_host=budget.kept_host, is_identity=False, cube_ordered=True,
        cube_slots=cube_slots, cube_weights=cube_weights, compact=budget.compact,
    )
