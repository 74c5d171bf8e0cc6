"""Entropy-aware allocation: one budget of dense work, spent where attention is spread.

The normalised entropy h in [0, 1] of a head's coarse (cube-level) attention says how spread it
is: a head with low h puts its mass on a few key cubes and loses little when the rest are
skipped; a head with h near 1 needs most of them. Each (layer, head) gets the weight

    w = max(1 - C ** (-gamma * (1 - h)), 1e-3)   (C key cubes; normalised to mean 1 over the
                                                   heads the policy may change)

(the share of key cubes a head does not need: C ** h cubes is its attention's perplexity; to first
order this is gamma * ln C * (1 - h), and weight="power" uses (1 - h) ** gamma itself)

and the work that is skipped is handed out in proportion to w, under one pressure c >= 0:

    keep[l, h]  = clip(1 - c * w[l, h],                   keep_lo[l],  keep_hi[l])
    merge[l]    = clip(MERGE_PER_SKIP * c * mean_h w[l],  merge_lo[l], merge_hi[l])

with c found by bisection so that the estimated work equals the budget (the share of dense work
kept, 0.02..1):

    work = mean_l [ A * m_l**2 * mean_h keep[l, h] + (1 - A) * m_l ],   m_l = 1 - merge[l]

A is the attention share of a dense block's FLOPs (`attention_share`; ~0.71 for Wan 2.1 1.3B
at 480p x 81 frames), attention cost scales with keep and with the square of the tokens left
after merging, the linear layers with the tokens. gamma = 0, or mode "static", gives every head
the same weight: the same keep and merge ratio everywhere. Merge ratios are rounded to
MERGE_STEP (each distinct ratio costs one merge plan per model call) and keep ratios to whole
key cubes (largest remainder per layer), and keep is re-solved after each rounding so that the
budget still holds.

`PolicyRun` is the state of one sampling run: the latest entropy each layer reported (device
tensors, no host sync when stored), and the decision in force. Decisions are recomputed every
`refresh` steps, at the first call of a step, from one device->host copy of the entropies; the
rest is O(layers x heads) numpy on the host. Everything is deterministic.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = [
    "MODES", "MIN_BUDGET", "MERGE_PER_SKIP", "MERGE_STEP", "WAN_1_3B_480P_ATTENTION_SHARE",
    "PolicyConfig", "Limits", "Allocation", "allocate", "work_share", "step_budget", "attention_share",
    "coarse_entropy", "PolicyRun", "WEIGHTS",
]

MODES = ("entropy", "static")
MIN_BUDGET = 0.02
# Merging touches every op of a block (attention, cross-attention, FFN) and its errors are not
# local to one head, so for the same pressure it moves at a quarter of the rate attention
# sparsity does: sparse attention is spent first, merging joins as the budget gets tight.
MERGE_PER_SKIP = 0.25
MERGE_STEP = 0.1
# Wan 2.1 1.3B (dim 1536, FFN 8960, 30 layers) at 480p x 81 frames: 21 x 30 x 52 = 32760 tokens,
# 512 text tokens: self-attention 2*N*d MACs per token against 4d^2 + 2d^2 + 2*d*ffn for the
# linear layers and 2*512*d for cross-attention -> 0.70-0.71. See attention_share().
WAN_1_3B_480P_ATTENTION_SHARE = 0.71
_SOLVE_ROUNDS = 3
WEIGHT_FLOOR = 1e-3
WEIGHTS = ("perplexity", "power")


def attention_share(dim: int, ffn_dim: int, tokens: int, text_tokens: int = 512) -> float:
    """Share of a Wan-style block's FLOPs spent in self-attention (QK^T and PV) for `tokens`
    tokens: the rest are the q/k/v/o and cross-attention projections, the FFN, and
    cross-attention over `text_tokens` (norms, modulation and RoPE are ignored)."""
    if min(dim, ffn_dim, tokens) <= 0 or text_tokens < 0:
        raise ValueError("dim, ffn_dim and tokens must be positive, text_tokens >= 0")
    attn = 2.0 * tokens * dim
    linear = 4.0 * dim * dim + 2.0 * dim * dim + 2.0 * dim * ffn_dim + 2.0 * text_tokens * dim
    return attn / (attn + linear)


@dataclass(frozen=True)
class PolicyConfig:
    """The USV Policy node's settings."""

    budget: float = 0.25  # share of dense work kept, MIN_BUDGET..1
    gamma: float = 1.0  # how strongly entropy moves the budget; 0 = static
    refresh: int = 2  # steps between recomputations
    mode: str = "entropy"
    early: float = 0.0  # first controlled step gets budget * (1 + early), the last budget * (1 - early)
    attention_share: float = WAN_1_3B_480P_ATTENTION_SHARE
    weight: str = "perplexity"  # how entropy becomes a weight (see _weights); "power" = (1 - h) ** gamma

    def __post_init__(self):
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not (
                MIN_BUDGET <= float(self.budget) <= 1.0):
            raise ValueError(f"budget must be a number in [{MIN_BUDGET}, 1] (share of dense work kept), got {self.budget!r}")
        if not isinstance(self.gamma, (int, float)) or not (0.0 <= float(self.gamma) <= 10.0):
            raise ValueError(f"gamma must be in [0, 10], got {self.gamma!r}")
        if isinstance(self.refresh, bool) or not isinstance(self.refresh, int) or self.refresh < 1:
            raise ValueError(f"refresh must be a whole number of steps >= 1, got {self.refresh!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}, got {self.mode!r}")
        if not isinstance(self.early, (int, float)) or not (0.0 <= float(self.early) <= 1.0):
            raise ValueError(f"early must be in [0, 1], got {self.early!r}")
        if self.weight not in WEIGHTS:
            raise ValueError(f"weight must be one of {list(WEIGHTS)}, got {self.weight!r}")
        if not isinstance(self.attention_share, (int, float)) or not (0.0 < float(self.attention_share) < 1.0):
            raise ValueError(f"attention_share must be in (0, 1), got {self.attention_share!r}")


@dataclass(frozen=True)
class Limits:
    """What the features on the model let the policy change, per layer.

    keep_lo/keep_hi: range of keep ratios (lo = hi fixes it; 1 = dense attention);
    merge_lo/merge_hi: range of merge ratios (share of tokens removed; 0 = no merging);
    num_cubes: key cubes per query cube, to round keep to whole cubes (None: no rounding).
    """

    heads: int
    keep_lo: tuple
    keep_hi: tuple
    merge_lo: tuple
    merge_hi: tuple
    num_cubes: int | None = None

    def __post_init__(self):
        n = len(self.keep_lo)
        if self.heads < 1 or n < 1:
            raise ValueError("limits need at least one layer and one head")
        for name in ("keep_hi", "merge_lo", "merge_hi"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"limits: {name} has {len(getattr(self, name))} layers, keep_lo has {n}")
        for lo, hi in zip(self.keep_lo, self.keep_hi):
            if not (0.0 < lo <= hi <= 1.0):
                raise ValueError(f"limits: keep range [{lo}, {hi}] must satisfy 0 < lo <= hi <= 1")
        for lo, hi in zip(self.merge_lo, self.merge_hi):
            if not (0.0 <= lo <= hi < 1.0):
                raise ValueError(f"limits: merge range [{lo}, {hi}] must satisfy 0 <= lo <= hi < 1")

    @property
    def layers(self) -> int:
        return len(self.keep_lo)

    @classmethod
    def uniform(cls, layers: int, heads: int, keep=(1.0, 1.0), merge=(0.0, 0.0), num_cubes=None, fixed=()):
        """Same ranges on every layer except those in `fixed`, which stay dense and unmerged."""
        kl = tuple(1.0 if i in fixed else keep[0] for i in range(layers))
        kh = tuple(1.0 if i in fixed else keep[1] for i in range(layers))
        ml = tuple(0.0 if i in fixed else merge[0] for i in range(layers))
        mh = tuple(0.0 if i in fixed else merge[1] for i in range(layers))
        return cls(heads, kl, kh, ml, mh, num_cubes)


@dataclass(frozen=True)
class Allocation:
    keep: np.ndarray  # (layers, heads) keep ratios
    merge: np.ndarray  # (layers,) merge ratios
    work: float  # estimated share of dense work
    target: float  # the budget this allocation aimed at
    provisional: bool = False  # decided without any entropy observed (uniform weights)

    def layer_keep(self, layer: int):
        """keep of one layer as the attention API takes it: a float when all heads agree (no
        per-call host sync in the kernels' setup), else a (heads,) float tensor."""
        row = self.keep[layer]
        if np.all(row == row[0]):
            return float(row[0])
        return torch.from_numpy(row.copy())


def work_share(keep, merge, attention_share: float = WAN_1_3B_480P_ATTENTION_SHARE) -> float:
    """Estimated share of dense DiT work: keep (layers, heads) or (layers,), merge (layers,)."""
    k = np.asarray(keep, dtype=np.float64)
    k = k.mean(-1) if k.ndim == 2 else k
    return float(_work(k, np.asarray(merge, dtype=np.float64), float(attention_share)))


def _work(layer_keep: np.ndarray, merge: np.ndarray, a: float) -> np.ndarray:
    """work_share over the last axis: layer_keep (..., layers), merge (..., layers)."""
    m = 1.0 - merge
    return (a * m * m * layer_keep + (1.0 - a) * m).mean(-1)


def step_budget(budget: float, step: int, first: int, last: int, early: float) -> float:
    """The budget of one step: a linear ramp over the controlled steps first..last from
    budget * (1 + early) to budget * (1 - early) (mean = budget), clipped to [MIN_BUDGET, 1]."""
    if early <= 0.0 or last <= first:
        return float(budget)
    x = min(max((step - first) / (last - first), 0.0), 1.0)
    return float(min(1.0, max(MIN_BUDGET, budget * (1.0 + early * (1.0 - 2.0 * x)))))


def _normalised(w: np.ndarray, free: np.ndarray) -> np.ndarray:
    """w scaled to mean 1 over the free entries; all ones when they carry no weight."""
    if not free.any():
        return np.ones_like(w)
    mean = w[free].mean()
    return w / mean if mean > 0 else np.ones_like(w)


def _solve(cost, target: float, hi: float) -> float:
    """Smallest pressure c in [0, hi] with cost(c) <= target, cost non-increasing in c and
    vectorised over an array of pressures. A few rounds of a 33-point grid narrow the bracket
    (one numpy expression per round instead of a Python loop per bisection step), then linear
    interpolation inside it; the result never overshoots the target."""
    if cost(np.zeros(1))[0] <= target:
        return 0.0
    if cost(np.array([hi]))[0] > target:
        return hi
    lo = 0.0
    for _ in range(_SOLVE_ROUNDS):
        grid = np.linspace(lo, hi, 33)
        vals = cost(grid)
        i = int(np.argmax(vals <= target))  # first point at or under the target; vals[0] is above
        lo, hi = grid[i - 1], grid[i]
    c_lo, c_hi = cost(np.array([lo, hi]))
    c = lo + (hi - lo) * (c_lo - target) / (c_lo - c_hi) if c_lo > c_hi else hi
    return float(c) if cost(np.array([c]))[0] <= target + 1e-9 else float(hi)


def _round_shares(x: np.ndarray, step: float, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Round a vector to multiples of `step`, conserving its sum by largest remainder (ties to
    the lower index), then clip to [lo, hi]."""
    units = x / step
    n = np.floor(units + 1e-9)
    extra = int(round(float(units.sum() - n.sum())))
    if extra > 0:
        n[np.argsort(-(units - n), kind="stable")[:extra]] += 1
    return np.clip(n * step, lo, hi)


def _round_keep(keep: np.ndarray, lo: np.ndarray, hi: np.ndarray, cubes: int) -> np.ndarray:
    """keep -> whole key cubes per head, conserving each layer's total by largest remainder
    (ties to the lower head index), within the layer's range."""
    want = keep * cubes
    lo_n = np.maximum(1, np.ceil(lo[:, None] * cubes - 1e-6))
    hi_n = np.maximum(lo_n, np.ceil(hi[:, None] * cubes - 1e-6))
    n = np.floor(want + 1e-9)
    frac = want - n
    # layers whose heads all agree round up as a float keep does in the attention API, and stay
    # uniform (a float keep per call, no per-head path); the others conserve their total
    uniform = np.all(keep == keep[:, :1], axis=1)
    extra = np.round(want.sum(1) - n.sum(1))
    order = np.argsort(-frac, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(keep.shape[1])[None, :].repeat(keep.shape[0], 0), axis=1)
    n += rank < extra[:, None]
    n[uniform] = np.ceil(want[uniform] - 1e-6)
    n = np.clip(n, lo_n, hi_n)
    return n / cubes


def _weights(h: np.ndarray, gamma: float, weight: str, num_cubes: int | None) -> np.ndarray:
    """How much of its attention each head can give up, from its normalised entropy h.

    perplexity: 1 - C ** (-gamma * (1 - h)). A head with entropy h spreads its mass over about
    C ** h of the C key cubes (its perplexity), a share C ** (h - 1); the weight is the share it
    does not need, so at pressure 1 (before normalisation) every head keeps its perplexity share.
    To first order in (1 - h) it is gamma * ln(C) * (1 - h): the power rule with gamma = 1.
    power: (1 - h) ** gamma.
    Without a cube count (num_cubes None) the perplexity rule falls back to the power rule."""
    if weight == "perplexity" and num_cubes:
        return 1.0 - float(num_cubes) ** (-float(gamma) * (1.0 - h))
    return (1.0 - h) ** float(gamma)


def allocate(entropy, budget: float, limits: Limits, gamma: float = 1.0, mode: str = "entropy",
             attention_share: float = WAN_1_3B_480P_ATTENTION_SHARE, weight: str = "perplexity") -> Allocation:
    """keep per (layer, head) and merge ratio per layer whose estimated work is `budget`.

    entropy: (layers, heads) normalised coarse entropy in [0, 1], or None (uniform weights).
    When the limits cannot reach the budget, the allocation saturates and `work` says what it
    reached.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {list(WEIGHTS)}, got {weight!r}")
    if not (MIN_BUDGET <= float(budget) <= 1.0):
        raise ValueError(f"budget must be in [{MIN_BUDGET}, 1], got {budget!r}")
    L, H = limits.layers, limits.heads
    keep_lo, keep_hi = np.asarray(limits.keep_lo, np.float64), np.asarray(limits.keep_hi, np.float64)
    merge_lo, merge_hi = np.asarray(limits.merge_lo, np.float64), np.asarray(limits.merge_hi, np.float64)
    provisional = entropy is None and mode != "static"
    if limits.num_cubes:
        # the least a head can keep is one whole cube: solve with the floor the kernels will apply
        cubes = int(limits.num_cubes)
        keep_lo = np.maximum(1.0, np.ceil(keep_lo * cubes - 1e-6)) / cubes
        keep_hi = np.maximum(keep_lo, keep_hi)
    if mode == "static" or entropy is None or gamma == 0:
        w = np.ones((L, H))
    else:
        h = np.nan_to_num(np.asarray(entropy, dtype=np.float64), nan=1.0)
        if h.shape != (L, H):
            raise ValueError(f"entropy must be (layers, heads) = ({L}, {H}), got {h.shape}")
        # the small floor lets perfectly spread heads (h = 1) give way once every other head has
        # reached its limit, so the budget is met whenever the limits allow it
        w = np.maximum(_weights(np.clip(h, 0.0, 1.0), gamma, weight, limits.num_cubes), WEIGHT_FLOOR)
    free_keep = keep_hi > keep_lo
    free_merge = merge_hi > merge_lo
    wk = _normalised(w, np.broadcast_to(free_keep[:, None], (L, H)))
    wm = _normalised(w.mean(1), free_merge)

    def keep_at(c):  # c: (K,) pressures -> (K, L, H)
        return np.clip(1.0 - c[:, None, None] * wk, keep_lo[:, None], keep_hi[:, None])

    def merge_at(c):  # (K,) -> (K, L)
        return np.clip(MERGE_PER_SKIP * c[:, None] * wm, merge_lo, merge_hi)

    # pressure at which every entry with positive weight has reached its limit
    positive = np.concatenate([wk[wk > 0], MERGE_PER_SKIP * wm[wm > 0]])
    c_max = 1.0 / positive.min() if positive.size else 1.0
    a = float(attention_share)
    c = _solve(lambda c: _work(keep_at(c).mean(-1), merge_at(c), a), float(budget), c_max)
    merge = merge_at(np.array([c]))[0]
    levels = np.unique(merge[free_merge])
    if levels.size > 1:
        # one merge plan per distinct ratio and model call: round to MERGE_STEP keeping the total
        # merged share, then re-solve keep for the budget
        merge = _round_shares(merge, MERGE_STEP, merge_lo, merge_hi)
        c = _solve(lambda c: _work(keep_at(c).mean(-1), merge[None], a), float(budget), c_max)
    keep = keep_at(np.array([c]))[0]
    if limits.num_cubes:
        keep = _round_keep(keep, keep_lo, keep_hi, int(limits.num_cubes))
    return Allocation(keep=keep, merge=merge, work=work_share(keep, merge, a), target=float(budget),
                      provisional=provisional)


def coarse_entropy(q: torch.Tensor, k: torch.Tensor, grid=None, cube=(4, 4, 4), block_sizes=None,
                   scale: float | None = None, pack_edges: bool = True) -> torch.Tensor:
    """(B, heads) normalised entropy of the cube-level attention softmax(q_c k_c^T * scale),
    averaged over query blocks: what VSA's selection reports, for calls that run dense. Costs one
    pooling pass over q and k and a (cubes x cubes) product per head; stays on q's device."""
    from .attention.reference import coarse_entropy as _entropy, coarse_scores
    from .tiling import blocked_layout, cube_tiling

    if block_sizes is not None:
        layout = blocked_layout(block_sizes, device=q.device)
    else:
        tiling = cube_tiling(grid, cube, q.device)
        layout = tiling.packed if pack_edges else tiling.layout
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    with torch.no_grad():
        return _entropy(coarse_scores(q, k, layout, scale))


@dataclass
class PolicyRun:
    """The policy's state during one sampling run of one model clone.

    Features call `observe` with each layer's entropy (device tensors, kept as they are) and
    `decision` at every call; a decision is computed at the first call of a step when none is in
    force, `refresh` steps after the last one, or when the last one was made before any entropy
    had been seen. `limits` is called once, at the first decision.
    """

    config: PolicyConfig
    limits: object  # () -> Limits
    first_step: int = 0  # first step the policy controls (earlier ones are dense)
    observed: dict = field(default_factory=dict)  # layer -> (B, heads) tensor, latest
    decisions: dict = field(default_factory=dict)  # step -> Allocation in force
    refreshed_at: list = field(default_factory=list)  # steps at which a decision was computed
    seconds: float = 0.0  # host time spent deciding (including the one device->host copy)
    _current: Allocation | None = None
    _decided_at: int = -1
    _limits: Limits | None = None

    def observe(self, layer: int, entropy: torch.Tensor) -> None:
        self.observed[layer] = entropy.detach()

    def _due(self, step: int) -> bool:
        if self._current is None:
            return True
        if step == self._decided_at:
            return False
        return (step - self._decided_at >= self.config.refresh
                or (self._current.provisional and bool(self.observed)))

    def wants_entropy(self, step: int) -> bool:
        """Whether a dense call at `step` should measure its coarse entropy: only when the next
        step recomputes (or nothing has been seen yet), and never in static mode."""
        if self.config.mode == "static":
            return False
        if not self.observed or self._current is None:
            return True
        return step + 1 - self._decided_at >= self.config.refresh

    def _entropy_table(self, layers: int, heads: int):
        if not self.observed:
            return None
        keys = sorted(self.observed)
        # one device->host copy for all layers
        stacked = torch.stack([self.observed[k].float().mean(0) for k in keys]).cpu().numpy().astype(np.float64)
        table = np.full((layers, heads), np.nan)
        for row, k in zip(stacked, keys):
            if 0 <= k < layers and row.shape == (heads,):
                table[k] = row
        seen = ~np.isnan(table[:, 0])
        if not seen.any():
            return None
        # layers not seen yet (dense blocks that were never measured) take the mean of the others
        table[~seen] = table[seen].mean(0)
        return table

    def decision(self, step: int, num_steps: int = 0) -> Allocation:
        if not self._due(step):
            self.decisions.setdefault(step, self._current)
            return self._current
        t0 = time.perf_counter()
        if self._limits is None:
            self._limits = self.limits() if callable(self.limits) else self.limits
        lim = self._limits
        cfg = self.config
        entropy = None if cfg.mode == "static" else self._entropy_table(lim.layers, lim.heads)
        early = cfg.early if cfg.mode == "entropy" else 0.0
        budget = step_budget(cfg.budget, step, self.first_step, max(self.first_step, num_steps - 1), early)
        alloc = allocate(entropy, budget, lim, cfg.gamma, cfg.mode, cfg.attention_share, cfg.weight)
        self._current, self._decided_at = alloc, step
        self.decisions[step] = alloc
        self.refreshed_at.append(step)
        self.seconds += time.perf_counter() - t0
        return alloc
