"""Flow-matching sampling as ComfyUI runs Wan 2.1: shifted sigmas (shift 8, the "simple" schedule),
Euler steps, classifier-free guidance. Used to train, evaluate and time the world model outside
ComfyUI; the same schedule inside ComfyUI is KSampler(euler, simple) on ModelSamplingDiscreteFlow."""

from __future__ import annotations

import torch

SHIFT = 8.0  # ComfyUI's WAN21_T2V sampling_settings


def shift_sigma(t: torch.Tensor | float, shift: float = SHIFT):
    return shift * t / (1 + (shift - 1) * t)


def sigmas(steps: int, shift: float = SHIFT) -> torch.Tensor:
    """steps + 1 sigmas from 1 down to 0."""
    return shift_sigma(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64), shift).float()


@torch.no_grad()
def sample(model, cond: torch.Tensor, uncond: torch.Tensor | None, noise: torch.Tensor, steps: int = 50, cfg: float = 5.0, shift: float = SHIFT) -> torch.Tensor:
    """model(x, timestep, context) -> velocity. noise (B, 16, T, H, W); cond/uncond (B, L, 4096).
    With cfg != 1 the conditional and unconditional passes run as one batch."""
    return solve(model, cond, uncond, noise, sigmas(steps, shift).tolist(), cfg)[1]


@torch.no_grad()
def solve(model, cond, uncond, noise, grid: list[float], cfg: float, record=()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """sample's Euler steps on the sigmas of grid (descending, ending at 0) -> (the state at each
    sigma of record, which must be in grid; the sample)."""
    x, states = noise, {}
    guided = uncond is not None and cfg != 1.0
    for s, s_next in zip(grid[:-1], grid[1:]):
        for r in record:
            if abs(s - r) <= 1e-6:
                states[r] = x
        t = torch.full((x.shape[0],), s * 1000.0, device=x.device)
        if guided:
            v_c, v_u = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
            v = v_u + cfg * (v_c - v_u)
        else:
            v = model(x, t, cond)
        x = x + (s_next - s) * v.to(x.dtype)
    return [states[r] for r in record], x
