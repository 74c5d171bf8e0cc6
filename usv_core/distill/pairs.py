"""DMD's regression term (Yin et al. 2024, the first DMD): pairs of noise and the frozen teacher's
sample from that noise (its own sampler: Euler steps with CFG), made once at the start. The
student's first step from the same noise is pulled towards the teacher's sample; with
`--regress-at all` every step of the schedule is, from the teacher's own state at that step's
sigma on the way there (as CausVid starts its few-step students from the teacher's ODE).

Distribution matching alone only asks that the student's samples be likely under the teacher;
on USV World it left the student's motion at half the teacher's and two runs of one recipe 0.1
apart. The pairs say which video each noise should become, which also holds the student to the
teacher's layout of colours and shapes.

They cost the teacher's sampling once per pair: half a minute for 1024 USV World pairs on a GPU,
minutes each for a real Wan at 480p. So they are kept beside the checkpoint as they are made (a
command stopped half-way keeps what it sampled) and a resumed run reads them back; they are drawn
from the run's seed, so a run that finds no usable file makes the same set again."""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..world.sampling import sigmas, solve
from .data import to_device
from .losses import x0_from_velocity


def teacher_solve(teacher, cond, uncond, z, *, steps: int, cfg: float, record=()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher's sampler from noise z (ComfyUI's schedule: shift 8, `steps` Euler steps), with
    the sigmas in `record` added as nodes -> (its state at each of them, the sample)."""
    grid = sigmas(steps).tolist()
    grid += [r for r in record if all(abs(g - r) > 1e-6 for g in grid)]
    return solve(teacher, cond, uncond, z, sorted(grid, reverse=True), cfg, record)


FIELDS = ("states", "target", "cond")


class TeacherPairs:
    """n pairs: the teacher's states at sigmas_at (the first is 1: the noise itself), its sample,
    and the conditioning. With `cache`, the pairs made so far are written there every
    `save_seconds` and at the end, and read back when its `key` (what makes them) matches."""

    def __init__(self, teacher, captions, n: int, latent_shape, gen: torch.Generator, noise_gen: torch.Generator,
                 device, *, sigmas_at, steps: int, cfg: float, autocast, chunk: int = 64, progress=None,
                 cache: str = "", key: dict | None = None, save_seconds: float = 60.0):
        # stored in bf16 on a GPU (where the networks compute in bf16 anyway): 2048 USV World pairs
        # of the first step take 0.9 GB
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.sigmas_at = list(sigmas_at)
        key = json.dumps({"n": n, "shape": list(latent_shape), "sigmas_at": self.sigmas_at, "steps": steps,
                          "cfg": cfg, "chunk": chunk, "dtype": str(dtype), **(key or {})}, sort_keys=True)
        stored = _read(cache, key, device) if cache else {}
        self.loaded = len(stored["target"]) if stored else 0
        parts = {f: [stored[f]] if stored else [] for f in FIELDS}
        last_save = time.time()
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            # drawn for every chunk, stored or not, so that the ones after continue the same streams
            cond, uncond, _ = captions.batch(gen, m, device)
            z = torch.randn((m, *latent_shape), generator=noise_gen, device=device)
            if i + m <= self.loaded:
                continue
            with autocast():
                at, x0 = teacher_solve(teacher, cond, uncond, z, steps=steps, cfg=cfg, record=self.sigmas_at)
            parts["states"].append(torch.stack([x.float() for x in at], 1).to(dtype))
            parts["target"].append(x0.float().to(dtype))
            parts["cond"].append(cond.to(dtype))
            if progress:
                progress(i + m, n)
            if cache and (i + m == n or time.time() - last_save > save_seconds):
                _write(cache, key, {f: torch.cat(parts[f]) for f in FIELDS})
                last_save = time.time()
        self.states, self.target, self.cond = (torch.cat(parts[f]) for f in FIELDS)

    def __len__(self) -> int:
        return self.states.shape[0]

    def batch(self, gen: torch.Generator, n: int):
        """(the teacher's states (n, steps, ...), its samples, conditioning) of n pairs drawn with gen."""
        idx = to_device(torch.randint(0, len(self), (n,), generator=gen), self.states.device)
        return self.states[idx].float(), self.target[idx].float(), self.cond[idx].float()


def _read(path: str, key: str, device) -> dict:
    """The pairs stored at path if they were made as `key` says, else {} (made again)."""
    if not os.path.exists(path):
        return {}
    with safe_open(path, framework="pt", device=str(device)) as f:
        if (f.metadata() or {}).get("key") != key:
            return {}
        return {name: f.get_tensor(name) for name in FIELDS}


def _write(path: str, key: str, tensors: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata={"key": key})
    os.replace(tmp, path)


def regression_loss(student, states, target, cond, sigmas_at, sparsity_at) -> torch.Tensor:
    """Mean squared error, over the regressed steps, of the student's x0 from the teacher's state
    at each step's sigma against the teacher's sample (latent space: USV World's VAE has no
    perceptual loss to borrow)."""
    losses = []
    for k, sigma in enumerate(sigmas_at):
        x = states[:, k]
        s = torch.full((x.shape[0],), sigma, device=x.device)
        x0 = x0_from_velocity(x, s, student(x, s * 1000.0, cond, sparsity_at(k)).to(x.dtype))
        losses.append(F.mse_loss(x0.float(), target))
    return torch.stack(losses).mean()
