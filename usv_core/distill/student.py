"""The student's forward with the sparsity it will be sampled with: VSA on grid self-attention and
cube-local token merging, laid out exactly as the ComfyUI nodes (USV Sparse Attention, USV Token
Merge) run them on Wan, so that what the student learns to compensate is what it meets at
inference.

SparseWanDiT is usv_core.world's WanDiT with blocks that take a per-call sparsity context. Its
parameters and state-dict names are WanDiT's (hence Wan 2.1's): the exported student is a plain
Wan checkpoint. Each block does all of its work inside its own forward, which is what FSDP2 needs
(it gathers a block's shards in that block's pre-forward hook)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..attention import vsa_attention, vsa_attention_blocked
from ..merge import plan_merge
from ..world.dit import Block, WanDiT

METRICS = ("keys", "hidden")


@dataclass(frozen=True)
class Sparsity:
    """What the student runs with. keep 1 and merge 0 is the dense model.

    dense_steps: sampling steps (indices into the few-step schedule) that run dense;
    dense_blocks: blocks whose attention stays dense; merge_blocks: blocks that merge (None: all
    but the first and the last, the USV Token Merge default); metric: what tokens are paired by
    (the node's default, 'keys'); backend and pack_edges: vsa_attention's ('auto' = Triton on CUDA)."""

    keep: float = 1.0
    merge: float = 0.0
    cube: tuple[int, int, int] = (4, 4, 4)
    dense_steps: int = 0
    dense_blocks: frozenset = frozenset()
    merge_blocks: frozenset | None = None
    metric: str = "keys"
    backend: str = "auto"
    pack_edges: bool = False  # vsa_attention's; students are distilled on one block per cube by default

    def __post_init__(self):
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {self.keep}")
        if not 0.0 <= self.merge <= 0.9:
            raise ValueError(f"merge ratio must be in [0, 0.9], got {self.merge}")
        if self.metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {self.metric!r}")

    @property
    def is_dense(self) -> bool:
        return self.keep >= 1.0 and self.merge <= 0.0

    def merging_blocks(self, layers: int) -> frozenset:
        if self.merge_blocks is not None:
            return frozenset(self.merge_blocks)
        return frozenset(range(1, layers - 1)) if layers > 2 else frozenset()


DENSE = Sparsity()


@dataclass
class CallContext:
    """Shared by the blocks of one forward call."""

    grid: tuple[int, int, int]
    sparsity: Sparsity
    merging: frozenset
    plan: object = None  # built by the first merging block, reused by the others (as the node does)
    stats: dict = field(default_factory=dict)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """world.dit.apply_rope for tables of shape (N, D/2) or per batch element (B, N, D/2)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).type_as(x)


def _kernel_dtype(t: torch.Tensor) -> torch.Tensor:
    # The Triton kernels take bf16/fp16; under autocast q and k leave the rotary embedding in
    # float32, so the cast the ComfyUI model does implicitly is made here.
    return t.to(torch.bfloat16) if t.is_cuda and t.dtype == torch.float32 else t


class SparseBlock(Block):
    def forward(self, x, e, rope, context, ctx: CallContext | None = None, index: int = 0):  # type: ignore[override]
        if ctx is None:
            return super().forward(x, e, rope, context)
        plan = None
        if index in ctx.merging:
            if ctx.plan is None:
                with torch.no_grad():  # the node plans without gradients; grouping is a choice, not a function
                    metric = self.self_attn.k(self.norm1(x)) if ctx.sparsity.metric == "keys" else x
                    ctx.plan = plan_merge(metric, ctx.grid, ctx.sparsity.merge, ctx.sparsity.cube)
            plan = ctx.plan
        x_in = x
        if plan is not None:
            x = x_merged = plan.merge(x)
            rope = (plan.gather(rope[0][None], 1), plan.gather(rope[1][None], 1))
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(0) + e).unbind(2)
        y = self._self_attention(self.norm1(x) * (1 + scale1) + shift1, rope, ctx, plan, index)
        x = x + y * gate1
        x = x + self.cross_attn(self.norm3(x), context)
        x = x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2
        # each token keeps its own residual stream and receives its group's update
        return plan.unmerge_update(x_in, x_merged, x) if plan is not None else x

    def _self_attention(self, x, rope, ctx: CallContext, plan, index: int):
        sa = self.self_attn
        b, n, _ = x.shape
        q = _rope(sa.norm_q(sa.q(x)).view(b, n, sa.heads, -1), *rope).transpose(1, 2)
        k = _rope(sa.norm_k(sa.k(x)).view(b, n, sa.heads, -1), *rope).transpose(1, 2)
        v = sa.v(x).view(b, n, sa.heads, -1).transpose(1, 2)
        sp = ctx.sparsity
        if sp.keep >= 1.0 or index in sp.dense_blocks:
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            q, k, v = (_kernel_dtype(t) for t in (q, k, v))
            if plan is not None and not plan.is_identity:
                y = vsa_attention_blocked(q, k, v, plan.block_sizes_host, sp.keep, backend=sp.backend)
            else:
                y = vsa_attention(q, k, v, ctx.grid, sp.keep, cube=sp.cube, backend=sp.backend,
                                  pack_edges=sp.pack_edges)
            ctx.stats["sparse_calls"] = ctx.stats.get("sparse_calls", 0) + 1
        return sa.o(y.transpose(1, 2).reshape(b, n, -1).to(x.dtype))


class SparseWanDiT(WanDiT):
    """WanDiT whose forward takes `sparsity` (a Sparsity, or None for dense)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # WanDiT builds its own blocks; giving them the subclass keeps their parameters and names.
        for block in self.blocks:
            block.__class__ = SparseBlock

    @classmethod
    def from_dit(cls, dit: WanDiT) -> "SparseWanDiT":
        cfg = dict(dim=dit.dim, ffn_dim=dit.blocks[0].ffn[0].out_features, num_layers=len(dit.blocks),
                   in_dim=dit.patch_embedding.in_channels, out_dim=dit.out_dim)
        student = cls(**cfg)
        student.load_state_dict(dit.state_dict())
        return student.to(next(dit.parameters()).device)

    def forward(self, x, timestep, context, sparsity: Sparsity | None = None, stats: dict | None = None):  # type: ignore[override]
        if sparsity is None or sparsity.is_dense:
            return super().forward(x, timestep, context)
        x, grid, e, e0, context, rope = self.embed(x, timestep, context)
        ctx = CallContext(grid, sparsity, sparsity.merging_blocks(len(self.blocks)))
        for i, block in enumerate(self.blocks):
            x = block(x, e0, rope, context, ctx, i)
        if stats is not None:
            stats.update(ctx.stats)
            if ctx.plan is not None:
                stats["merged_share"] = ctx.plan.num_merged / ctx.plan.num_tokens
        return self.output(x, e, grid)
