"""USV Token Merge: similar tokens inside each cube are merged before a transformer block and
copied back after it, so the whole block runs on fewer tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from .adapters import WanAdapter, adapter_for
from .policy import USV_POLICY
from .sparse_attention import CUBES, parse_blocks
from .usv_patch import CallContext, patched_clone

METRICS = ("keys", "hidden")


@dataclass(frozen=True)
class TokenMerge:
    ratio: float
    dense_steps: int
    blocks: frozenset
    metric: str
    policy: object = None  # usv_core.policy.PolicyConfig: merge ratio per block from it, self.ratio the most

    @staticmethod
    def cube(ctx: CallContext) -> tuple[int, int, int]:
        # Groups stay inside the cubes sparse attention selects from, whichever node came first.
        sparse = ctx.patch.features.get("sparse_attention")
        return sparse.cube if sparse is not None else CUBES["4x4x4"]

    def _metric(self, ctx: CallContext, block_index: int, x: torch.Tensor) -> torch.Tensor:
        if self.metric == "keys":
            # ToMe's choice: tokens whose keys agree are the ones attention cannot tell apart.
            block = ctx.model.blocks[block_index]
            return block.self_attn.k(block.norm1(x))
        return x

    def run_block(self, ctx: CallContext, args: dict, extra: dict, inner):
        from ..usv_core.merge import plan_merge

        x = args["img"]
        if (self.ratio <= 0.0 or ctx.step < self.dense_steps or ctx.block not in self.blocks
                or x.shape[1] != ctx.grid_tokens):
            if x.shape[1] != ctx.grid_tokens and self.ratio > 0.0:
                ctx.patch.warn_once("merge-layout", "token merging skips calls with tokens outside the video grid")
            return inner(args, extra)
        ratio = self.ratio
        if self.policy is not None:
            from .policy import policy_run

            ratio = float(policy_run(ctx).decision(ctx.step, ctx.num_steps).merge[ctx.block])
            if ratio <= 0.0:
                return inner(args, extra)
        plan = ctx.merge_plans.get(ratio)
        if plan is None or plan.batch != x.shape[0]:
            # One plan per model call (per ratio, when a policy varies it by block), from the first
            # merging block's metric: building one costs about as much as a fifth of a block on an
            # H100, so every block reuses it.
            with torch.no_grad():
                plan = plan_merge(self._metric(ctx, ctx.block, x), ctx.grid, ratio, self.cube(ctx))
            ctx.merge_plans[ratio] = plan
        ctx.merge_plan = plan
        merged = dict(args)
        xm = plan.merge(x)
        merged["img"] = xm
        merged["pe"] = plan.gather(args["pe"], dim=1)
        vec = args.get("vec")
        if isinstance(vec, torch.Tensor) and vec.ndim == 4 and vec.shape[1] > 1:
            # per-frame modulation (Wan 2.2 5B): spread to tokens, then follow the merged tokens
            per_token = torch.repeat_interleave(vec, x.shape[1] // vec.shape[1], dim=1)
            merged["vec"] = plan.gather(per_token, dim=1)
        ctx.block_sizes, ctx.merged_tokens = plan.block_sizes_host, plan.num_merged  # host copy: no sync
        try:
            out = inner(merged, extra)
        finally:
            ctx.block_sizes, ctx.merged_tokens = None, None
        ctx.patch.run.merged[(ctx.step, ctx.block)] = plan.num_merged / plan.num_tokens
        ctx.patch.run.count(ctx.step, ctx.block, "merged")
        # Each token keeps its own residual stream and receives its group's update.
        out = dict(out)
        out["img"] = plan.unmerge_update(x, xm, out["img"])
        return out


def default_blocks(layers: int) -> frozenset:
    """All but the first and the last block: those shape and finish the video's detail."""
    return frozenset(range(1, layers - 1)) if layers > 2 else frozenset()


class USVTokenMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVTokenMerge",
            display_name="USV Token Merge",
            category="USV",
            description=(
                "Merges similar tokens inside each 3-D cube before a transformer block and copies them back "
                "after it: the whole block (attention, cross-attention, feed-forward) runs on fewer tokens."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("ratio", default=0.5, min=0.0, max=0.9, step=0.05, display_mode=io.NumberDisplay.slider,
                               tooltip="Share of tokens removed in each chosen block. 0 changes nothing."),
                io.Int.Input("dense_steps", default=1, min=0, max=1000,
                             tooltip="The first denoising steps run on all tokens."),
                io.String.Input("blocks", default="",
                                tooltip="Blocks that merge, such as '1-28'; empty: all but the first and the last."),
                io.Combo.Input("metric", options=list(METRICS), default="keys",
                               tooltip="Similarity used to pair tokens: attention keys, or the hidden states."),
                USV_POLICY.Input("policy", optional=True,
                                 tooltip="USV Policy: merge ratio per block from attention entropy under one budget; "
                                         "ratio above is then the most any block merges."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, ratio, dense_steps, blocks, metric, policy=None) -> io.NodeOutput:
        facts, adapter = adapter_for(model)
        if adapter is not WanAdapter:
            raise ValueError(f"USV Token Merge supports Wan 2.1 / 2.2 models; this is {facts.family}")
        if not 0.0 <= ratio <= 0.9:
            raise ValueError(f"ratio must be in [0, 0.9], got {ratio}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
        chosen = parse_blocks(blocks, facts.layers, "blocks") if blocks.strip() else default_blocks(facts.layers)
        feature = TokenMerge(ratio=float(ratio), dense_steps=int(dense_steps), blocks=chosen, metric=metric,
                             policy=policy)
        return io.NodeOutput(patched_clone(model, adapter, "token_merge", feature))
