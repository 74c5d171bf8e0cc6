"""Few-step sampling for DMD-distilled flow-matching models (FastWan, LightX2V, CausVid-style).

Sigmas here are flow-matching sigmas: x_sigma = (1 - sigma) * x0 + sigma * noise, from 1.0 (pure
noise) down to 0.0 (clean). A distilled model was trained on a handful of fixed timesteps; the
schedule gives exactly those, and each step lets the model predict x0 and moves to the next sigma,
either by drawing fresh noise (stochastic, as DMD trains) or along the ODE (deterministic).

Nothing here knows ComfyUI: the caller supplies the denoiser, and for models whose latents are not
noised the flow way it supplies the re-noising rule too.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Callable

import torch

MAX_TIMESTEP = 1000.0
MODES = ("stochastic", "deterministic")


@dataclass(frozen=True)
class Preset:
    timesteps: tuple[float, ...]
    shift: float
    about: str


PRESETS: dict[str, Preset] = {
    # FastVideo publishes these timesteps already shifted: they are the sigmas themselves.
    "fastwan-3step": Preset((1000.0, 757.0, 522.0), 1.0, "FastWan (FastVideo sparse distillation, DMD), 3 steps"),
    # LightX2V/CausVid-style 4-step distills: evenly spaced timesteps, warped by shift 5.
    "lightx2v-4step": Preset((1000.0, 750.0, 500.0, 250.0), 5.0, "LightX2V / CausVid-style 4-step distills, shift 5"),
}
CUSTOM = "custom"
PRESET_NAMES = tuple(PRESETS) + (CUSTOM,)


def parse_timesteps(text: str) -> list[float]:
    """'1000, 750, 500, 250' -> [1000.0, 750.0, 500.0, 250.0]; a pasted Python list works too."""
    body = text.strip()
    if body.startswith("[") and body.endswith("]"):
        body = body[1:-1]
    items = [item.strip() for item in body.split(",")]
    items = [item for item in items if item]  # a trailing comma is harmless
    if not items:
        raise ValueError("timesteps is empty: give comma-separated timesteps from 1000 down, e.g. '1000, 750, 500, 250'")
    values = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"timesteps: {item!r} is not a number; write numbers separated by commas, "
                             f"e.g. '1000, 750, 500, 250'") from None
        if not math.isfinite(value):
            raise ValueError(f"timesteps: {item!r} is not a finite number; use values in (0, 1000]")
        values.append(value)
    check_timesteps(values)
    return values


def check_timesteps(timesteps) -> None:
    for value in timesteps:
        if value > MAX_TIMESTEP or value < 0:
            raise ValueError(f"timesteps: {value:g} is outside 0..1000; timesteps count from 1000 (pure noise) down")
        if value == 0:
            raise ValueError("timesteps: remove the 0; the schedule ends at sigma 0 by itself")
    for a, b in zip(timesteps, timesteps[1:]):
        if b >= a:
            raise ValueError(f"timesteps must decrease strictly, from noisy to clean: {a:g} is followed by {b:g}")


def check_shift(shift: float) -> None:
    if not (math.isfinite(shift) and shift > 0):
        raise ValueError(f"shift must be a positive number (1 leaves the timesteps as they are; LightX2V uses 5), got {shift}")


def shift_time(t: float, shift: float) -> float:
    """Flow-matching time shift, as Wan and SD3 use it: larger shift spends more of the schedule at high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flow_sigmas(timesteps, shift: float = 1.0) -> list[float]:
    """Timesteps in (0, 1000] -> flow sigmas, shifted, with the final 0.0 appended."""
    check_timesteps(list(timesteps))
    check_shift(shift)
    return [shift_time(ts / MAX_TIMESTEP, shift) for ts in timesteps] + [0.0]


def preset_sigmas(preset: str, timesteps: str = "", shift: float = 1.0) -> list[float]:
    """Flow sigmas of a named preset; `timesteps` and `shift` are read only for 'custom'."""
    if preset == CUSTOM:
        return flow_sigmas(parse_timesteps(timesteps), shift)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESET_NAMES)}")
    p = PRESETS[preset]
    return flow_sigmas(p.timesteps, p.shift)


# --- the step rules -------------------------------------------------------------------------

def flow_renoise(x0: torch.Tensor, noise: torch.Tensor, sigma_next) -> torch.Tensor:
    """Stochastic step: put the prediction back at sigma_next with fresh noise (the DMD rule)."""
    return (1.0 - sigma_next) * x0 + sigma_next * noise


def ode_step(x: torch.Tensor, x0: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    """Deterministic step: keep the noise the model implied, x0 + sigma_next * (x - x0) / sigma
    (Euler in sigma; for flow latents it is (1 - s') x0 + s' * implied noise)."""
    return x0 + (sigma_next / sigma) * (x - x0)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose 'stochastic' or 'deterministic'")


# The fresh noise is keyed by the sigma it noises to, not by the step's index: a schedule split
# over two samplers (Wan 2.2's high- and low-noise experts, SplitSigmas) then draws exactly the
# noise of the unsplit run, and editing one timestep leaves the other steps' noise alone. The
# odd golden-ratio multiplier spreads keys over the 64-bit seed space and never maps a sigma > 0
# to noise_seed itself, so the re-noising never repeats a RandomNoise given the same seed.
_SEED_MIX = 0x9E3779B97F4A7C15
_SEED_SPACE = 1 << 64


def step_seed(noise_seed: int, sigma_next) -> int:
    """Seed of the fresh noise that puts x0 at sigma_next (a float32 sigma, as SIGMAS hold)."""
    key = struct.unpack("<I", struct.pack("<f", float(sigma_next)))[0]
    return (int(noise_seed) + key * _SEED_MIX) % _SEED_SPACE


def step_noise(shape, noise_seed: int, sigma_next, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Fresh noise for the step to sigma_next, drawn on the CPU (as ComfyUI draws initial noise) so
    that the same seed gives the same video on any device."""
    gen = torch.Generator(device="cpu").manual_seed(step_seed(noise_seed, sigma_next))
    return torch.randn(tuple(shape), generator=gen, dtype=torch.float32, device="cpu").to(dtype=dtype, device=device)


Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Renoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, mode: str = "stochastic",
           noise_seed: int = 0, renoise: Renoise = flow_renoise, callback=None) -> torch.Tensor:
    """Run the few-step loop from x at sigmas[0]. `denoise(x, sigma)` returns the x0 prediction;
    `callback` gets k-diffusion's dict (i, x, sigma, sigma_hat, denoised) once per step.
    A final sigma of 0 returns the last x0 itself; any other final sigma (a split schedule)
    leaves x at that sigma for whatever samples next."""
    check_mode(mode)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": x0})
        if float(sigma_next) <= 0.0:
            x = x0
        elif mode == "stochastic":
            x = renoise(x0, step_noise(x.shape, noise_seed, sigma_next, x.dtype, x.device), sigma_next)
        else:
            x = ode_step(x, x0, sigma, sigma_next)
    return x
