"""USV Policy: one budget of dense work, spent over layers, heads and steps by attention entropy.

The node only builds a `usv_core.policy.PolicyConfig` (the USV_POLICY value). USV Sparse Attention
and USV Token Merge take it as their optional `policy` input; their own ratios then become caps
(the sparse node's keep is the least any head keeps, the merge node's ratio the most any block
merges). During a run the features share one `PolicyRun`, created here at first use and kept in
the run's statistics, so that it belongs to one model clone and one run and ON_CLEANUP drops it.
"""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..usv_core import policy as core

USV_POLICY = io.Custom("USV_POLICY")


def model_heads(dm) -> int:
    """Attention heads of a diffusion model the adapters know (Wan, LTX-Video)."""
    if hasattr(dm, "num_heads"):
        return int(dm.num_heads)
    return int(dm.transformer_blocks[0].attn1.heads)


def model_dims(dm) -> tuple[int | None, int | None]:
    """(width, FFN width) of a Wan or LTX-Video diffusion model; None where unknown."""
    blocks = getattr(dm, "blocks", None) or getattr(dm, "transformer_blocks", None)
    dim = getattr(dm, "dim", None) or getattr(dm, "inner_dim", None)
    if not blocks or not dim:
        return None, None
    for mod in blocks[0].modules():
        if type(mod).__name__ == "Linear" and getattr(mod, "in_features", None) == dim and mod.out_features > dim:
            return int(dim), int(mod.out_features)  # the first widening projection is the FFN's
    return int(dim), None


def limits_for(ctx) -> core.Limits:
    """What the features on this model let the policy change, per layer: a feature without the
    policy keeps its own fixed ratio, one with it gives a range bounded by its own ratio."""
    from ..usv_core.tiling import num_blocks

    feats = ctx.patch.features
    sparse, merge = feats.get("sparse_attention"), feats.get("token_merge")
    layers = len(ctx.patch.adapter.block_keys(ctx.model))
    keep_lo, keep_hi, merge_lo, merge_hi = [], [], [], []
    for layer in range(layers):
        if sparse is None or layer in sparse.dense_blocks or sparse.keep >= 1.0:
            lo = hi = 1.0
        elif sparse.policy is None:
            lo = hi = sparse.keep
        else:
            lo, hi = sparse.keep, 1.0
        keep_lo.append(lo)
        keep_hi.append(hi)
        if merge is None or layer not in merge.blocks or merge.ratio <= 0.0:
            lo = hi = 0.0
        elif merge.policy is None:
            lo = hi = merge.ratio
        else:
            lo, hi = 0.0, merge.ratio
        merge_lo.append(lo)
        merge_hi.append(hi)
    cube = sparse.cube if sparse is not None else (4, 4, 4)
    return core.Limits(model_heads(ctx.model), tuple(keep_lo), tuple(keep_hi), tuple(merge_lo), tuple(merge_hi),
                       num_blocks(ctx.grid, cube, pack_edges=sparse is None or sparse.pack_edges))


def policy_run(ctx) -> core.PolicyRun | None:
    """This run's policy state, or None when no feature on the model has a policy."""
    run = ctx.patch.run
    if run.policy is not None:
        return run.policy
    feats = ctx.patch.features
    with_policy = [f for f in (feats.get("sparse_attention"), feats.get("token_merge"))
                   if f is not None and getattr(f, "policy", None) is not None]
    if not with_policy:
        return None
    config = with_policy[0].policy
    if any(f.policy != config for f in with_policy[1:]):
        ctx.patch.warn_once("policy-mismatch", "USV Sparse Attention and USV Token Merge got different policies; "
                                               "the sparse attention node's one decides for both")
    dim, ffn = model_dims(ctx.model)
    if dim and ffn:
        # the budget is a share of this model's work at this size: attention weighs less on small
        # grids and narrow models than the 71% of Wan 1.3B at 480p
        config = dataclasses.replace(config, attention_share=core.attention_share(dim, ffn, ctx.grid_tokens))
    run.policy = core.PolicyRun(config=config, limits=lambda: limits_for(ctx),
                                first_step=min(f.dense_steps for f in with_policy))
    return run.policy


class USVPolicy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVPolicy",
            display_name="USV Policy",
            category="USV",
            description=(
                "One budget of dense work, spent where attention is spread. Connect to the 'policy' input of "
                "USV Sparse Attention and/or USV Token Merge: their own keep / ratio become caps, and every "
                "layer, head and step gets keep and merge ratios from the normalised entropy h of its coarse "
                "attention over C key cubes, weight 1 - C^(-gamma (1 - h)) (the share of cubes a head does not "
                "need): concentrated heads are pruned harder, spread heads keep more, and the estimated work "
                "matches the budget (cost model: attention vs linear FLOPs of this model at this size)."
            ),
            inputs=[
                io.Float.Input("budget", default=0.25, min=core.MIN_BUDGET, max=1.0, step=0.01,
                               display_mode=io.NumberDisplay.slider,
                               tooltip="Share of the dense work each accelerated step keeps: 1.0 is dense, 0.25 about "
                                       "4x less work (attention and merged linear layers together)."),
                io.Float.Input("gamma", default=1.0, min=0.0, max=10.0, step=0.1,
                               tooltip="How strongly entropy moves the budget between layers and heads; 0 is uniform."),
                io.Int.Input("refresh", default=2, min=1, max=1000,
                             tooltip="Steps between recomputations from the latest observed entropies."),
                io.Combo.Input("mode", options=list(core.MODES), default="entropy",
                               tooltip="entropy: spend the budget by attention entropy; static: the same keep and "
                                       "merge ratio everywhere (for comparison)."),
                io.Float.Input("early", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Early, high-noise steps get more: the first controlled step gets "
                                       "budget x (1 + early), the last budget x (1 - early); the mean stays the budget."),
            ],
            outputs=[USV_POLICY.Output(display_name="policy")],
        )

    @classmethod
    def execute(cls, budget, gamma, refresh, mode, early=0.0) -> io.NodeOutput:
        return io.NodeOutput(core.PolicyConfig(budget=float(budget), gamma=float(gamma), refresh=int(refresh),
                                               mode=mode, early=float(early)))
