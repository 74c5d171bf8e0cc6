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
from ..world.dit import Block, WanDiT, set_compiled

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


def _project(block: Block, x, e, cos, sin):
    """The dense work before self-attention: modulation, norm, q / k / v with their norms and
    rotary embedding -> (q, k, v) as (B, heads, N, D), and the modulation's other four terms."""
    shift1, scale1, gate1, shift2, scale2, gate2 = (block.modulation.unsqueeze(0) + e).unbind(2)
    h = block.norm1(x) * (1 + scale1) + shift1
    sa = block.self_attn
    b, n, _ = x.shape
    q = _rope(sa.norm_q(sa.q(h)).view(b, n, sa.heads, -1), cos, sin).transpose(1, 2)
    k = _rope(sa.norm_k(sa.k(h)).view(b, n, sa.heads, -1), cos, sin).transpose(1, 2)
    v = sa.v(h).view(b, n, sa.heads, -1).transpose(1, 2)
    return q, k, v, (gate1, shift2, scale2, gate2)


def _finish(block: Block, x, y, context, mods):
    """The dense work after self-attention (y: (B, heads, N, D)): output projection and gate,
    cross-attention, feed-forward."""
    gate1, shift2, scale2, gate2 = mods
    b, n, _ = x.shape
    x = x + block.self_attn.o(y.transpose(1, 2).reshape(b, n, -1).to(x.dtype)) * gate1
    x = x + block.cross_attn(block.norm3(x), context)
    return x + block.ffn(block.norm2(x) * (1 + scale2) + shift2) * gate2


class SparseBlock(Block):
    # compile_dense_parts swaps in compiled versions, per block
    project, finish = staticmethod(_project), staticmethod(_finish)

    def forward(self, x, e, rope, context, ctx: CallContext | None = None, index: int = 0):  # type: ignore[override]
        if ctx is None:  # dense: Block's forward, through the same parts
            q, k, v, mods = self.project(self, x, e, *rope)
            return self.finish(self, x, F.scaled_dot_product_attention(q, k, v), context, mods)
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
        q, k, v, mods = self.project(self, x, e, *rope)
        y = self._self_attention(q, k, v, ctx, plan, index)
        x = self.finish(self, x, y, context, mods)
        # each token keeps its own residual stream and receives its group's update
        return plan.unmerge_update(x_in, x_merged, x) if plan is not None else x

    def _self_attention(self, q, k, v, ctx: CallContext, plan, index: int):
        sp = ctx.sparsity
        if sp.keep >= 1.0 or index in sp.dense_blocks:
            return F.scaled_dot_product_attention(q, k, v)
        q, k, v = (_kernel_dtype(t) for t in (q, k, v))
        if plan is not None and not plan.is_identity:
            y = vsa_attention_blocked(q, k, v, plan.block_sizes_host, sp.keep, backend=sp.backend)
        else:
            y = vsa_attention(q, k, v, ctx.grid, sp.keep, cube=sp.cube, backend=sp.backend, pack_edges=sp.pack_edges)
        ctx.stats["sparse_calls"] = ctx.stats.get("sparse_calls", 0) + 1
        return y


def compile_dense_parts(model: WanDiT) -> None:
    """torch.compile the dense work of every block, so that the many small elementwise kernels of
    norms, modulation and rotary embedding fuse. A WanDiT's blocks are compiled whole
    (world.dit.set_compiled); a SparseWanDiT's before and after their attention, which stays eager
    (its selection and merge planning read the data), one compiled function for all blocks."""
    if not isinstance(model, SparseWanDiT):
        set_compiled(model, True)
        return
    project, finish = torch.compile(_project), torch.compile(_finish)
    for block in model.blocks:
        block.project, block.finish = project, finish


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
