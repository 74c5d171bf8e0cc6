"""USV Accelerate: one slider for artists. Speed s sets sparse attention, token merging and the
entropy policy together, with a budget of 1/s of the dense DiT work per accelerated step.

The budget is counted by the policy's cost model (usv_core.policy.work_share): attention is ~71%
of a Wan 2.1 1.3B block's FLOPs at 480p x 81 frames (21 x 30 x 52 = 32760 tokens), the linear
layers the rest; attention work scales with keep x (tokens kept)^2, linear work with tokens kept.
Beyond ~3.4x sparse attention alone cannot reach the budget (the linear 29% stays), so token
merging takes over; the first and last blocks never merge.

Work is not time: sparse tiles run below the dense kernel's rate and the coarse pass, merging and
the policy cost extra. The speedup the node states is calibrated on measurement: on an H200, Wan
2.1 1.3B at 480p x 81 through the real nodes in a 3-step DMD run with no dense step, a step took
0.306 of a dense one at speed 6 (work 1/6) and 0.192 at speed 10 (work 1/10)
(bench/results/e2e_NVIDIA_H200.json, bench/e2e.py); time = 0.0205 + 1.713 x work through those
two points, read off for the other speeds, for the accelerated steps; VAE and text encoder not
included. Other cards differ: USV Report measures the user's own.

Dense steps follow the schedule the node runs in (known only when sampling starts): a DMD
schedule of 4 steps or fewer runs none (its first step is a third of a 3-step run, and already
makes most of the video: dense it would be 57% of the run at speed 6), a longer one runs the
first `dense_share` of its steps dense (docs/policy.md: ~30% of a 50-step run keeps the layout).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from comfy_api.latest import io

from ..usv_core import policy as core
from .adapters import WanAdapter, adapter_for
from .sparse_attention import CUBES, SparseAttention
from .token_merge import TokenMerge, default_blocks
from .usv_patch import patched_clone

MAX_SPEED = 10
KEEP_FLOOR = 0.02  # the least a head keeps: about 1 key cube in 50
MERGE_CAP = 0.75  # the most a block merges away
FEW_STEPS = 4  # schedules this short (DMD distills) run no dense step
DENSE_SHARE = 0.3  # share of a longer schedule's steps that run dense
UNKNOWN_STEPS_DENSE = 1  # a sampler that names no schedule: the first step lays out the composition
# time of an accelerated step / dense step = TIME_FIXED + TIME_PER_WORK x work (H200, see above)
TIME_FIXED, TIME_PER_WORK = 0.0205, 1.713


def settings(speed: int) -> core.PolicyConfig | None:
    """The policy of a speed: budget 1/speed, entropy-weighted; None for speed 1 (dense)."""
    if isinstance(speed, bool) or not isinstance(speed, int) or not 1 <= speed <= MAX_SPEED:
        raise ValueError(f"speed must be a whole number from 1 (dense) to {MAX_SPEED}, got {speed!r}")
    if speed == 1:
        return None
    return core.PolicyConfig(budget=1.0 / speed, gamma=1.0, refresh=2, mode="entropy")


def work(speed: int, layers: int = 30, heads: int = 12, merging: bool = True) -> float:
    """Share of the dense DiT work an accelerated step keeps at this speed (cost model; 1 for speed 1)."""
    config = settings(speed)
    if config is None:
        return 1.0
    merge_blocks = default_blocks(layers) if merging else frozenset()
    limits = core.Limits(heads, (KEEP_FLOOR,) * layers, (1.0,) * layers, (0.0,) * layers,
                         tuple(MERGE_CAP if b in merge_blocks else 0.0 for b in range(layers)))
    return core.allocate(None, config.budget, limits, mode="static").work


def dense_steps(num_steps: int, share: float = DENSE_SHARE) -> int:
    """Dense steps at the start of a schedule of num_steps (0: not known)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0:
        raise ValueError(f"dense_share must be a number from 0 to 1, got {share!r}")
    if num_steps <= 0:
        return UNKNOWN_STEPS_DENSE
    if num_steps <= FEW_STEPS:
        return 0
    return min(num_steps, int(share * num_steps + 0.5))


class _Scheduled:
    """A feature whose dense steps are read off the running schedule: each call runs the plain
    feature with dense_steps for this schedule (one per schedule length, made once)."""

    def _for(self, ctx):
        n = dense_steps(ctx.num_steps, self.dense_share)
        made = self.resolved.get(n)
        if made is None:
            base = self.plain
            made = base(**{f.name: getattr(self, f.name) for f in dataclasses.fields(base)} | {"dense_steps": n})
            self.resolved[n] = made
        return made


@dataclasses.dataclass(frozen=True)
class ScheduledSparseAttention(_Scheduled, SparseAttention):
    plain: ClassVar[type] = SparseAttention
    dense_share: float = DENSE_SHARE
    resolved: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def block_gate(self, ctx, args):
        return self._for(ctx).block_gate(ctx, args)

    def attend(self, ctx, call, text: int = 0):
        return self._for(ctx).attend(ctx, call, text)


@dataclasses.dataclass(frozen=True)
class ScheduledTokenMerge(_Scheduled, TokenMerge):
    plain: ClassVar[type] = TokenMerge
    dense_share: float = DENSE_SHARE
    resolved: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    def run_block(self, ctx, args, extra, inner):
        return self._for(ctx).run_block(ctx, args, extra, inner)


def run_speedup(per_step: float, steps: int, share: float = DENSE_SHARE) -> float:
    """DiT speedup of a whole run of `steps` whose accelerated steps are per_step times faster."""
    dense = dense_steps(steps, share)
    return steps / (dense + (steps - dense) / per_step)


def speedup_at(work_share: float) -> float:
    """Expected DiT speedup of a step doing this share of the dense work (time per work measured above)."""
    return 1.0 if work_share >= 1.0 else max(1.0, 1.0 / (TIME_FIXED + TIME_PER_WORK * work_share))


def estimate(speed: int, layers: int = 30, heads: int = 12, merging: bool = True) -> float:
    """Expected DiT speedup per accelerated step (1 for speed 1)."""
    return speedup_at(work(speed, layers, heads, merging))


def _table() -> str:
    return ", ".join(f"{s}: {estimate(s):.1f}x" for s in range(1, MAX_SPEED + 1))


class USVAccelerate(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVAccelerate",
            display_name="USV Accelerate",
            category="USV",
            description=(
                "One knob for USV: sparse attention, token merging and the entropy policy together. Speed s keeps "
                "1/s of the dense work per accelerated step, spent where attention is spread. Schedules of 4 steps "
                "or fewer (DMD distills) accelerate every step; longer ones run their first dense_share of steps "
                "dense. "
                f"Expected DiT speedup per step, calibrated on an H200 with Wan 2.1 1.3B at 480p x 81 frames: {_table()}. "
                "Smaller videos gain less (attention is a smaller share). Speed 1 leaves the model as it is."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("speed", default=3, min=1, max=MAX_SPEED, step=1, display_mode=io.NumberDisplay.slider,
                             tooltip=f"1 = dense (unchanged), {MAX_SPEED} = most aggressive. Expected speedup: {_table()}."),
                # optional: API-format prompts written before it existed still validate
                io.Float.Input("dense_share", default=DENSE_SHARE, min=0.0, max=1.0, step=0.05, optional=True,
                               tooltip=f"Share of the steps that run dense first, on schedules of more than {FEW_STEPS} "
                                       f"steps: they lay out the composition (0.3 of 50 steps = 15). Schedules of "
                                       f"{FEW_STEPS} steps or fewer (DMD) run none."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, speed, dense_share=DENSE_SHARE) -> io.NodeOutput:
        config = settings(int(speed))
        dense_steps(0, dense_share)  # a bad share is an error now, not when sampling starts
        if config is None:
            return io.NodeOutput(model, ui={"text": ("speed 1: dense, the model is unchanged",)})
        facts, adapter = adapter_for(model)
        share = float(dense_share)
        sparse = ScheduledSparseAttention(keep=KEEP_FLOOR, dense_steps=UNKNOWN_STEPS_DENSE, dense_blocks=frozenset(),
                                          cube=CUBES["4x4x4"], policy=config, dense_share=share)
        out = patched_clone(model, adapter, "sparse_attention", sparse)
        merging = adapter is WanAdapter  # token merging has a Wan adapter only
        if merging:
            merge = ScheduledTokenMerge(ratio=MERGE_CAP, dense_steps=UNKNOWN_STEPS_DENSE,
                                        blocks=default_blocks(facts.layers), metric="keys", policy=config,
                                        dense_share=share)
            out = patched_clone(out, adapter, "token_merge", merge)
        w = work(int(speed), facts.layers, facts.heads, merging)
        x = speedup_at(w)
        text = (f"speed {speed}: budget {config.budget:.0%} of dense work per accelerated step "
                f"(cost model: {w:.0%} reachable); expected about {x:.1f}x faster denoising per accelerated step "
                f"(calibrated on an H200, Wan 2.1 1.3B at 480p x 81 frames; "
                f"sparse attention{' + token merging' if merging else ''} + entropy policy). "
                f"Dense steps: none on schedules of {FEW_STEPS} steps or fewer (DMD: about {x:.1f}x for the run), "
                f"the first {share:.0%} of longer ones ({dense_steps(50, share)} of 50 steps: about "
                f"{run_speedup(x, 50, share):.1f}x for the run)")
        return io.NodeOutput(out, ui={"text": (text,)})
