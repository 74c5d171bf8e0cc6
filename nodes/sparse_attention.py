"""USV Sparse Attention: Video Sparse Attention on a model's grid self-attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from comfy_api.latest import io

from .adapters import SUPPORTED_HEAD_DIMS, WanAdapter, adapter_for
from .policy import USV_POLICY
from .usv_patch import AttentionCall, CallContext, patched_clone

CUBES = {"4x4x4": (4, 4, 4), "1x8x8": (1, 8, 8), "2x4x8": (2, 4, 8)}
BLOCKS = {"auto": None, "packed": True, "cubes": False}  # -> pack_edges; auto: cubes when gates are loaded
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _checkpoint_files() -> list[str]:
    try:
        import folder_paths

        return [f for f in folder_paths.get_filename_list("diffusion_models") if f.endswith((".safetensors", ".sft"))]
    except Exception:  # the list is a convenience; the node still works without it
        return []


def parse_blocks(text: str, layers: int, name: str = "dense_blocks") -> frozenset[int]:
    """'0, 1, 29' or '0-2' -> block indices; a clear error for anything else."""
    out: set[int] = set()
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        try:
            if "-" in part:
                lo, hi = (int(s) for s in part.split("-", 1))
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            else:
                out.add(int(part))
        except ValueError:
            raise ValueError(f"{name}: cannot read {part!r}; write block numbers like '0, 1, 29' or ranges like '0-2'") from None
    bad = sorted(b for b in out if b < 0 or b >= layers)
    if bad:
        raise ValueError(f"{name}: block {bad[0]} does not exist; this model has {layers} blocks (0-{layers - 1})")
    return frozenset(out)


def kernel_support(call: AttentionCall, cube) -> str | None:
    """Why the sparse path cannot serve this call, or None when it can. Off the GPU the exact
    PyTorch path serves any head dim and float dtype; on the GPU only the Triton kernels do."""
    if call.head_dim not in SUPPORTED_HEAD_DIMS:
        return f"head dim {call.head_dim} (sparse kernels have {SUPPORTED_HEAD_DIMS})"
    if call.q.dtype not in _DTYPES:
        return f"dtype {call.q.dtype} (sparse attention takes float16, bfloat16, float32)"
    if call.q.is_cuda:
        from ..usv_core.attention import supports

        ok, why = supports(call.q, cube)
        return None if ok else why
    return None


@dataclass(frozen=True)
class SparseAttention:
    keep: float
    dense_steps: int
    dense_blocks: frozenset
    cube: tuple[int, int, int]
    gates: object = None  # GateWeights of a VSA-trained checkpoint, or None
    policy: object = None  # usv_core.policy.PolicyConfig: keep per (layer, head) from it, self.keep the least
    pack_edges: bool = True  # partial edge cubes joined into full blocks (usv_core.tiling)

    def _dense(self, ctx: CallContext, call: AttentionCall, prun):
        """A call that runs dense: measure its coarse entropy when the policy will decide next step."""
        if prun is not None and prun.wants_entropy(ctx.step):
            from ..usv_core.policy import coarse_entropy

            n = ctx.grid_tokens if ctx.block_sizes is None else call.q_len  # text after the grid is not scored
            h = coarse_entropy(call.q[:, :, :n], call.k[:, :, :n], ctx.grid, self.cube, block_sizes=ctx.block_sizes,
                               pack_edges=self.pack_edges)
            ctx.patch.run.entropy[(ctx.step, ctx.block)] = h
            prun.observe(ctx.block, h)
        return None

    def block_gate(self, ctx: CallContext, args: dict):
        """Compute this block's gate from its input, before the block runs (Wan)."""
        ctx.gate = None
        if (self.gates is None or ctx.block < 0 or self.keep >= 1.0 or ctx.step < self.dense_steps
                or ctx.block in self.dense_blocks):
            return
        from .gate_weights import gate_for_block

        block = ctx.model.blocks[ctx.block]
        with torch.no_grad():
            ctx.gate = gate_for_block(self.gates, ctx.block, block, args["img"], args["vec"], block.self_attn.num_heads)

    def attend(self, ctx: CallContext, call: AttentionCall, text: int = 0):
        """The attention output, or None to run this call dense (the counters say why).
        text: tokens after the grid (HunyuanVideo's joint attention), attended and attending densely."""
        run = ctx.patch.run
        prun = None
        if self.policy is not None:
            from .policy import policy_run

            prun = policy_run(ctx)
        if ctx.step < self.dense_steps:
            run.count(ctx.step, ctx.block, "dense:step")
            return self._dense(ctx, call, prun)
        if ctx.block in self.dense_blocks:
            run.count(ctx.step, ctx.block, "dense:block")
            return self._dense(ctx, call, prun)
        if self.keep >= 1.0:
            run.count(ctx.step, ctx.block, "dense:keep")
            return self._dense(ctx, call, prun)
        keep = self.keep
        if prun is not None:
            keep = prun.decision(ctx.step, ctx.num_steps).layer_keep(ctx.block)
            if isinstance(keep, float) and keep >= 1.0:
                run.count(ctx.step, ctx.block, "dense:policy")
                return self._dense(ctx, call, prun)
        reason = kernel_support(call, self.cube)
        if reason is not None:
            ctx.patch.warn_once("support:" + reason, f"sparse attention cannot serve {reason}; running it dense")
            run.count(ctx.step, ctx.block, "dense:unsupported")
            return None
        from ..usv_core.attention import vsa_attention, vsa_attention_blocked, vsa_attention_joint

        gate = ctx.gate if ctx.gate is not None and ctx.gate.shape == call.q.shape else None
        if text:
            out, entropy = vsa_attention_joint(call.q, call.k, call.v, ctx.grid, keep, cube=self.cube,
                                               text_tokens=text, return_stats=True)
        elif ctx.block_sizes is not None:
            out, entropy = vsa_attention_blocked(call.q, call.k, call.v, ctx.block_sizes, keep, gate=gate,
                                                 return_stats=True)
        else:
            out, entropy = vsa_attention(call.q, call.k, call.v, ctx.grid, keep, cube=self.cube, gate=gate,
                                         return_stats=True, pack_edges=self.pack_edges)
        run.count(ctx.step, ctx.block, "sparse")
        run.entropy[(ctx.step, ctx.block)] = entropy
        run.keep[(ctx.step, ctx.block)] = keep
        if prun is not None:
            prun.observe(ctx.block, entropy)
        return call.output(out)


class USVSparseAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVSparseAttention",
            display_name="USV Sparse Attention",
            category="USV",
            description=(
                "Video Sparse Attention: tokens are grouped into 3-D cubes, a cheap coarse pass picks the key "
                "cubes each query cube needs, and exact attention runs only over those."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Float.Input("keep", default=0.125, min=0.02, max=1.0, step=0.005, display_mode=io.NumberDisplay.slider,
                               tooltip="Share of key cubes each query cube attends. 1.0 is dense attention."),
                io.Int.Input("dense_steps", default=1, min=0, max=1000,
                             tooltip="The first denoising steps stay dense: they lay out the composition."),
                io.String.Input("dense_blocks", default="",
                                tooltip="Blocks that stay dense, such as '0, 1, 29' or '0-2'."),
                io.Combo.Input("cube", options=list(CUBES), default="4x4x4",
                               tooltip="Cube of latent tokens (frames x height x width) that selection works on."),
                io.Combo.Input("gate_weights", options=["none"] + _checkpoint_files(), default="none", optional=True,
                               tooltip="A VSA-trained checkpoint (FastWan) whose to_gate_compress weights drive the "
                                       "gated coarse branch. Stock ComfyUI drops them on load; USV reads them here."),
                USV_POLICY.Input("policy", optional=True,
                                 tooltip="USV Policy: keep per layer and head from attention entropy under one "
                                         "budget; keep above is then the least any head keeps."),
                io.Combo.Input("blocks", options=list(BLOCKS), default="auto", optional=True,
                               tooltip="What selection picks among. packed: cubes, with the partial cubes at the "
                                       "grid's edges joined into full blocks (faster, 1.4x at keep 0.125 on Wan "
                                       "480p). cubes: one block per cube, as VSA-trained and USV-distilled "
                                       "models were trained. auto: cubes with gate_weights, else packed."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, keep, dense_steps, dense_blocks, cube, gate_weights="none", policy=None,
                blocks="auto") -> io.NodeOutput:
        facts, adapter = adapter_for(model)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        if cube not in CUBES:
            raise ValueError(f"cube must be one of {list(CUBES)}, got {cube!r}")
        if blocks not in BLOCKS:
            raise ValueError(f"blocks must be one of {list(BLOCKS)}, got {blocks!r}")
        gates = None
        if gate_weights and gate_weights != "none":
            if adapter is not WanAdapter:
                raise ValueError(f"gate_weights: gated VSA checkpoints exist for Wan; this model is {facts.family}")
            import folder_paths

            from .gate_weights import load_gate_weights

            path = folder_paths.get_full_path_or_raise("diffusion_models", gate_weights)
            gates = load_gate_weights(path, facts.layers, facts.heads * facts.head_dim)
        feature = SparseAttention(keep=float(keep), dense_steps=int(dense_steps),
                                  dense_blocks=parse_blocks(dense_blocks, facts.layers), cube=CUBES[cube], gates=gates,
                                  policy=policy, pack_edges=BLOCKS[blocks] if BLOCKS[blocks] is not None else gates is None)
        return io.NodeOutput(patched_clone(model, adapter, "sparse_attention", feature))
