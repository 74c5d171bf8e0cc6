"""The dense teacher's evaluation: videos for held-out prompts, their world score as mean and
standard error with the score's parts, each named colour's presence, and seconds per video."""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from .sampling import sample
from .scene import make_batch
from .score import score_details
from .vae import latent_norm
from .vocab import COLOR_NAMES

EVAL_SEED = 1_000_000_000  # evaluation prompts and clips come from seeds the training draws never use
PARTS = ("presence", "shape_ok", "smooth", "moving")


def held_out_prompts(n: int) -> list[str]:
    return [make_batch([EVAL_SEED + i], size=16, frames=1)[1][0] for i in range(n)]


def to_video(clips: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) in [0, 1] -> (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return clips.permute(0, 4, 1, 2, 3) * 2 - 1


def from_video(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, F, H, W) in [-1, 1] -> (B, F, H, W, 3) in [0, 1], float32."""
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)


def autocast(dev):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


@torch.no_grad()
def decode(vae, n: torch.Tensor, batch: int, dev) -> torch.Tensor:
    """Normalised latents -> (B, F, H, W, 3) in [0, 1] on the CPU."""
    out = []
    for i in range(0, n.shape[0], batch):
        with autocast(dev):
            out.append(from_video(vae.decode(latent_norm(n[i : i + batch], inverse=True))).cpu())
    return torch.cat(out)


@torch.no_grad()
def generate(dit, text, vae, prompts, dev, *, frames: int, size: int, steps: int, cfg: float, seed: int = 0, batch: int = 32, decode_batch: int = 8):
    """Videos (B, F, H, W, 3) for the prompts; the noise depends on the seed and the prompt's index only."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    lt, lh = (frames - 1) // 4 + 1, size // 8
    noise = torch.randn(len(prompts), 16, lt, lh, lh, generator=g)
    out = []
    for i in range(0, len(prompts), batch):
        p = prompts[i : i + batch]
        cond, uncond = text.encode(p, device=dev, warn=False), text.encode([""] * len(p), device=dev)
        with autocast(dev):
            n = sample(dit, cond, uncond, noise[i : i + batch].to(dev), steps=steps, cfg=cfg)
        out.append(decode(vae, n.float(), decode_batch, dev))
    return torch.cat(out)


def mean_se(xs) -> tuple[float, float]:
    xs = np.asarray(xs, dtype=np.float64)
    return float(xs.mean()), float(xs.std(ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else 0.0


def summarise(videos, prompts) -> dict:
    """World score and its parts over prompts (each prompt's part is the mean over its named
    objects), as mean and standard error, and the mean presence of each named colour."""
    details = [score_details(v, p) for v, p in zip(videos, prompts)]
    out: dict = {}
    m, se = mean_se([d["score"] for d in details])
    out["world_score"], out["world_score_se"] = m, se
    out["world_score_std"] = float(np.std([d["score"] for d in details]))
    for part in PARTS:
        m, se = mean_se([np.mean([o[part] for o in d["objects"]]) for d in details])
        out[part], out[part + "_se"] = m, se
    colours = {}
    for c in COLOR_NAMES:
        vals = [o["presence"] for d in details for o in d["objects"] if o["colour"] == c]
        if vals:
            colours[c] = {"presence": float(np.mean(vals)), "objects": len(vals)}
    out["colour_presence"] = colours
    out["per_prompt"] = [{"prompt": p, "score": round(d["score"], 4), **{k: round(float(np.mean([o[k] for o in d["objects"]])), 4) for k in PARTS}}
                         for p, d in zip(prompts, details)]
    return out


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def time_one_video(dit, text, vae, prompt, dev, *, frames: int, size: int, steps: int, cfg: float, runs: int = 3) -> dict:
    """One video at a time, as a user makes them: median of a few runs after a warm-up."""
    times, dit_times = [], []
    lt, lh = (frames - 1) // 4 + 1, size // 8
    for i in range(runs + 1):
        sync(dev)
        t0 = time.perf_counter()
        noise = torch.randn(1, 16, lt, lh, lh, generator=torch.Generator().manual_seed(i)).to(dev)
        cond, uncond = text.encode([prompt], device=dev, warn=False), text.encode([""], device=dev)
        with autocast(dev):
            n = sample(dit, cond, uncond, noise, steps=steps, cfg=cfg)
        sync(dev)
        t1 = time.perf_counter()
        decode(vae, n.float(), 1, dev)
        sync(dev)
        if i > 0:
            times.append(time.perf_counter() - t0)
            dit_times.append(t1 - t0)
    return {"seconds_per_video": float(np.median(times)), "dit_seconds_per_video": float(np.median(dit_times)),
            "vae_decode_seconds": float(np.median(times) - np.median(dit_times))}
