"""What a run did, as tables (layers x steps), numbers and a heatmap image, from the per-(step,
block) records the ComfyUI patch keeps: entropy (B, heads) tensors, keep ratios (float or per-head
tensor), kept token shares. Plain torch + numpy (no plotting library): the image is drawn with a
small colour ramp."""

from __future__ import annotations

import numpy as np
import torch

from .policy import WAN_1_3B_480P_ATTENTION_SHARE

__all__ = ["tables", "summary_numbers", "heatmap", "RAMP"]

# viridis-like anchors, dark (0) to bright (1); missing cells are grey
RAMP = np.array([[0.267, 0.005, 0.329], [0.229, 0.322, 0.546], [0.128, 0.567, 0.551],
                 [0.369, 0.789, 0.383], [0.993, 0.906, 0.144]])
MISSING = np.array([0.35, 0.35, 0.35])


def _mean(value) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().float().mean().cpu())
    return float(np.mean(value))


def tables(steps: int, layers: int, ran, entropy: dict, keep: dict, merged: dict) -> dict[str, np.ndarray]:
    """(layers, steps) float tables, NaN where a block did not run:
    entropy: mean over batch and heads (NaN where not measured);
    keep: mean keep over heads, 1 where the block ran dense;
    tokens: share of tokens the block ran on, 1 where it did not merge."""
    shape = (layers, steps)
    out = {name: np.full(shape, np.nan) for name in ("entropy", "keep", "tokens")}
    for (s, b) in ran:
        if 0 <= s < steps and 0 <= b < layers:
            out["keep"][b, s] = 1.0
            out["tokens"][b, s] = 1.0
    for src, name in ((entropy, "entropy"), (keep, "keep"), (merged, "tokens")):
        for (s, b), value in src.items():
            if 0 <= s < steps and 0 <= b < layers:
                out[name][b, s] = _mean(value)
    return out


def summary_numbers(t: dict[str, np.ndarray], attention_share: float = WAN_1_3B_480P_ATTENTION_SHARE) -> dict:
    """Shares over the blocks that ran: mean keep, mean token share, estimated work (the policy's
    cost model) and the speedup it implies for the DiT."""
    ran = ~np.isnan(t["keep"])
    if not ran.any():
        return {"attended": float("nan"), "tokens": float("nan"), "work": float("nan"), "speedup": float("nan"),
                "entropy": float("nan")}
    k, m = t["keep"][ran], t["tokens"][ran]
    a = float(attention_share)
    work = float(np.mean(a * m * m * k + (1.0 - a) * m))
    ent = t["entropy"][~np.isnan(t["entropy"])]
    return {"attended": float(k.mean()), "tokens": float(m.mean()), "work": work, "speedup": 1.0 / work,
            "entropy": float(ent.mean()) if ent.size else float("nan")}


def _colour(x: np.ndarray) -> np.ndarray:
    """values in [0, 1] (NaN = missing) -> (..., 3) RGB."""
    v = np.clip(np.nan_to_num(x, nan=0.0), 0.0, 1.0) * (len(RAMP) - 1)
    i = np.minimum(np.floor(v).astype(np.int64), len(RAMP) - 2)
    f = (v - i)[..., None]
    rgb = RAMP[i] * (1.0 - f) + RAMP[i + 1] * f
    return np.where(np.isnan(x)[..., None], MISSING, rgb)


def heatmap(panels: list[np.ndarray], cell: tuple[int, int] | None = None, gap: int = 6) -> torch.Tensor:
    """Panels of (layers, steps) values in [0, 1] side by side (layers top to bottom, steps left
    to right), each cell a block of pixels -> IMAGE (1, H, W, 3) float32 in [0, 1]."""
    if not panels:
        raise ValueError("heatmap needs at least one panel")
    layers, steps = panels[0].shape
    if cell is None:
        cell = (max(2, min(16, 240 // max(1, layers))), max(4, min(32, 160 // max(1, steps))))
    ch, cw = cell
    h, w = layers * ch, steps * cw
    width = len(panels) * w + (len(panels) - 1) * gap
    img = np.ones((h, width, 3))
    for n, p in enumerate(panels):
        rgb = _colour(np.asarray(p, dtype=np.float64))
        block = np.repeat(np.repeat(rgb, ch, axis=0), cw, axis=1)
        x0 = n * (w + gap)
        img[:, x0:x0 + w] = block
    return torch.from_numpy(img).float().unsqueeze(0).clamp(0.0, 1.0)
