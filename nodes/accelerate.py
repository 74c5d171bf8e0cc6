"""USV Accelerate: one slider for artists. Speed s sets sparse attention, token merging and the
entropy policy together, with a budget of 1/s of the dense DiT work per accelerated step.

The budget is counted by the policy's cost model (usv_core.policy.work_share): attention is ~71%
of a Wan 2.1 1.3B block's FLOPs at 480p x 81 frames (21 x 30 x 52 = 32760 tokens), the linear
layers the rest; attention work scales with keep x (tokens kept)^2, linear work with tokens kept.
Beyond ~3.4x sparse attention alone cannot reach the budget (the linear 29% stays), so token
merging takes over; the first and last blocks never merge.

Work is not time: sparse tiles run below the dense kernel's rate and the coarse pass, merging and
the policy cost extra. The speedup the node states is calibrated on measurement: on an H200, Wan
2.1 1.3B at 480p x 81, an accelerated step took 0.636 of a dense one at speed 3 (work 1/3) and
0.337 at speed 6 (work 1/6) (bench/results/wan_model_1.3B-480p_NVIDIA_H200.json); time = 0.036 +
1.80 x work through those two points, read off for the other speeds (beyond 6 an extrapolation),
for the steps after the first (dense) one; VAE and text encoder not included.
"""

from __future__ import annotations

from comfy_api.latest import io

from ..usv_core import policy as core
from .adapters import WanAdapter, adapter_for
from .sparse_attention import CUBES, SparseAttention
from .token_merge import TokenMerge, default_blocks
from .usv_patch import patched_clone

MAX_SPEED = 10
KEEP_FLOOR = 0.02  # the least a head keeps: about 1 key cube in 50
MERGE_CAP = 0.75  # the most a block merges away
DENSE_STEPS = 1  # the first step lays out the composition
# time of an accelerated step / dense step = TIME_FIXED + TIME_PER_WORK x work (H200, see above)
TIME_FIXED, TIME_PER_WORK = 0.036, 1.80


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
                "1/s of the dense work per step after the first (dense) one, spent where attention is spread. "
                f"Expected DiT speedup per step, calibrated on an H200 with Wan 2.1 1.3B at 480p x 81 frames: {_table()}. "
                "Smaller videos gain less (attention is a smaller share). Speed 1 leaves the model as it is."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Int.Input("speed", default=3, min=1, max=MAX_SPEED, step=1, display_mode=io.NumberDisplay.slider,
                             tooltip=f"1 = dense (unchanged), {MAX_SPEED} = most aggressive. Expected speedup: {_table()}."),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, speed) -> io.NodeOutput:
        config = settings(int(speed))
        if config is None:
            return io.NodeOutput(model, ui={"text": ("speed 1: dense, the model is unchanged",)})
        facts, adapter = adapter_for(model)
        sparse = SparseAttention(keep=KEEP_FLOOR, dense_steps=DENSE_STEPS, dense_blocks=frozenset(),
                                 cube=CUBES["4x4x4"], policy=config)
        out = patched_clone(model, adapter, "sparse_attention", sparse)
        merging = adapter is WanAdapter  # token merging has a Wan adapter only
        if merging:
            merge = TokenMerge(ratio=MERGE_CAP, dense_steps=DENSE_STEPS, blocks=default_blocks(facts.layers),
                               metric="keys", policy=config)
            out = patched_clone(out, adapter, "token_merge", merge)
        w = work(int(speed), facts.layers, facts.heads, merging)
        x = speedup_at(w)
        text = (f"speed {speed}: budget {config.budget:.0%} of dense work per step after the first "
                f"(cost model: {w:.0%} reachable); expected about {x:.1f}x faster denoising per step "
                f"(calibrated on an H200, Wan 2.1 1.3B at 480p x 81 frames; "
                f"sparse attention{' + token merging' if merging else ''} + entropy policy)")
        return io.NodeOutput(out, ui={"text": (text,)})
