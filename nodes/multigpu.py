"""USV Sequence Parallel: one Wan video on several GPUs, one process per GPU (Ulysses style).

ComfyUI runs one process on one device, so the ranks are ComfyUI processes started together by
`scripts/sequence_parallel.py` under torchrun, each executing the same API workflow in lockstep
(docs/multigpu.md says why and how). In each process this feature splits the tokens of every
diffusion-model call into contiguous shards, one per rank, from the first transformer block to
the last: every linear layer, the cross-attention and the feed-forward run on 1 / P of the
tokens; self-attention turns the shards into head shards and back (usv_core.parallel), so each
rank attends, sparse or dense, with its heads over the whole grid; after the last block the
shards are gathered and every rank holds the same output.

Without a process group of more than one rank (a plain ComfyUI) the node changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from comfy_api.latest import io

from ..usv_core.parallel.comm import check_heads, gather_tokens, heads_to_seq, seq_to_heads, shard_tokens, world
from .adapters import WanAdapter, adapter_for
from .usv_patch import _ATTN_PARAMS, _parse_attention_call, log, patched_clone


@dataclass
class _CallShards:
    """What one diffusion-model call's sharded blocks share: token count, the self-attention
    marker and the shards of per-token inputs (RoPE, Wan 2.2's per-token modulation), cut once."""

    tokens: int
    heads: int
    group: object
    calls_in_block: int = 0
    cut: dict = field(default_factory=dict)  # id(full tensor) -> (full, shard)

    def shard(self, t):
        if not isinstance(t, torch.Tensor) or t.dim() < 2 or t.shape[1] != self.tokens:
            return t  # broadcast over tokens (one modulation for all), or not per token at all
        hit = self.cut.get(id(t))
        if hit is None or hit[0] is not t:
            hit = (t, shard_tokens(t, 1, self.group))
            self.cut[id(t)] = hit
        return hit[1]


class ShardedBlock:
    """Per-block replacement outside USV's own: shard the tokens before the first block, gather
    them after the last; RoPE and per-token modulation are cut for every block."""

    def __init__(self, previous, shards: _CallShards, first: bool, last: bool):
        self.previous, self.shards, self.first, self.last = previous, shards, first, last

    def __call__(self, args, extra):
        s = self.shards
        s.calls_in_block = 0
        args = dict(args)
        if self.first:
            img = args["img"]
            if img.shape[1] != s.tokens:
                raise RuntimeError(f"USV Sequence Parallel: the first block got {img.shape[1]} tokens where the grid "
                                   f"has {s.tokens}")
            args["img"] = shard_tokens(img, 1, s.group)
        for key in ("pe", "vec"):
            if key in args:
                args[key] = s.shard(args[key])
        out = self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        if self.last:
            out = dict(out)
            out["img"] = gather_tokens(out["img"], s.tokens, 1, s.group)
        return out


class ShardedAttention:
    """The outermost attention override: a block's first call (its self-attention) goes to the
    overrides below with this rank's heads over all tokens; other calls pass as they came."""

    def __init__(self, previous, shards: _CallShards):
        self.previous, self.shards = previous, shards

    def _next(self, func, args, kwargs):
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)

    # opaque to torch.compile, as USV's own override is: routing reads a per-block call counter
    @torch.compiler.disable
    def __call__(self, func, *args, **kwargs):
        s = self.shards
        s.calls_in_block += 1
        if s.calls_in_block != 1:
            return self._next(func, args, kwargs)  # cross-attention: queries are token shards, keys the text
        call = _parse_attention_call(args, kwargs)
        if call is None or call.mask is not None:
            raise RuntimeError("USV Sequence Parallel: Wan self-attention came without plain q, k, v or with a mask; "
                               "remove the node (or the patch that changes the attention) to run this model")
        qh, kh, vh = (seq_to_heads(t, s.tokens, s.group) for t in (call.q, call.k, call.v))
        rest = {k: v for k, v in kwargs.items() if k not in _ATTN_PARAMS}
        precision = dict(zip(_ATTN_PARAMS, args)).get("attn_precision", kwargs.get("attn_precision"))
        if precision is not None:
            rest["attn_precision"] = precision
        out = self._next(func, (qh, kh, vh), dict(rest, heads=qh.shape[1], skip_reshape=True,
                                                   skip_output_reshape=True))
        out = heads_to_seq(out, call.heads, s.group)  # (B, heads, n_rank, D)
        if call.skip_output_reshape:
            return out
        b, h, n, d = out.shape
        return out.transpose(1, 2).reshape(b, n, h * d)


@dataclass(frozen=True)
class SequenceParallel:
    group: object = None  # torch.distributed process group; None: the default one

    def wrap_call(self, ctx, opts: dict) -> dict:
        """Called by USV's diffusion-model wrapper with the call's transformer_options (already a
        copy, with USV's override and block hooks in place); returns them sharded."""
        rank, size = world(self.group)
        patch = ctx.patch
        if size == 1:
            patch.warn_once("sp-single", "USV Sequence Parallel: no torch.distributed process group of more than "
                                         "one rank; the model runs in this process alone (start ComfyUI with "
                                         "scripts/sequence_parallel.py under torchrun to split it)")
            return opts
        if ctx.prefix or ctx.suffix:
            raise RuntimeError("USV Sequence Parallel splits plain video grids; this call has tokens before or after "
                               "the grid (reference or context latents): run it without the node")
        feats = patch.features
        merge, sparse = feats.get("token_merge"), feats.get("sparse_attention")
        if merge is not None:
            raise RuntimeError("USV Token Merge does not run under USV Sequence Parallel yet: remove one of them")
        if sparse is not None and (sparse.gates is not None or sparse.policy is not None):
            what = "gate_weights" if sparse.gates is not None else "a USV Policy"
            raise RuntimeError(f"USV Sequence Parallel does not run USV Sparse Attention with {what} yet: disconnect "
                               f"it, or remove USV Sequence Parallel")
        heads = int(ctx.model.num_heads)
        check_heads(heads, size)
        shards = _CallShards(tokens=ctx.grid_tokens, heads=heads, group=self.group)
        opts["optimized_attention_override"] = ShardedAttention(opts.get("optimized_attention_override"), shards)
        replace = dict(opts.get("patches_replace", {}))
        dit = dict(replace.get("dit", {}))
        keys = list(patch.adapter.block_keys(ctx.model))
        for i, key in enumerate(keys):
            dit[key] = ShardedBlock(dit.get(key), shards, first=i == 0, last=i == len(keys) - 1)
        replace["dit"] = dit
        opts["patches_replace"] = replace
        patch.run.count(ctx.step, -1, f"sequence-parallel:{size}")
        return opts


class USVSequenceParallel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVSequenceParallel",
            display_name="USV Sequence Parallel",
            category="USV",
            description=(
                "One Wan video on several GPUs: every transformer block runs on 1/N of the tokens on each of N "
                "ComfyUI processes (one per GPU), and attention exchanges heads so that each GPU attends with its "
                "heads over the whole video; the result equals one GPU's. Takes effect only when ComfyUI was "
                "started with scripts/sequence_parallel.py under torchrun (see docs/multigpu.md); in a plain "
                "ComfyUI it changes nothing. Works with USV Sparse Attention (without gate weights or a policy); "
                "not with USV Token Merge yet."
            ),
            inputs=[io.Model.Input("model", tooltip="A Wan 2.1 / 2.2 model; heads must divide by the number of GPUs.")],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model) -> io.NodeOutput:
        facts, adapter = adapter_for(model)
        if adapter is not WanAdapter:
            raise ValueError(f"USV Sequence Parallel supports Wan 2.1 / 2.2 models; this is {facts.family}")
        rank, size = world()
        if size > 1:
            log.info("USV Sequence Parallel: rank %d of %d", rank, size)
        return io.NodeOutput(patched_clone(model, adapter, "sequence_parallel", SequenceParallel()))
