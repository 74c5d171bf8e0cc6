"""Conditioning for distillation. DMD needs no videos: only what the student is asked for. For USV
World that is captions of random training scenes through the teacher's caption encoder; for a
real Wan checkpoint it is text-encoder outputs computed once elsewhere (umT5 is not part of this
package) and stored as safetensors: "cond" (P, L, 4096) and "uncond" (1, L, 4096)."""

from __future__ import annotations

import torch
from safetensors import safe_open

from ..world.evaluate import EVAL_SEED
from ..world.scene import sample_scene
from ..world.text import CaptionEncoder
from ..world.weights import load_text


class WorldCaptions:
    """Captions of training scenes (seeds below EVAL_SEED, so held-out prompts stay held out)."""

    def __init__(self, encoder: CaptionEncoder):
        self.encoder = encoder.eval().requires_grad_(False)
        with torch.no_grad():
            self._uncond = self.encoder.encode("", warn=False)

    @classmethod
    def from_file(cls, path: str) -> "WorldCaptions":
        return cls(load_text(path))

    @classmethod
    def tiny(cls, seed: int = 0) -> "WorldCaptions":
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(CaptionEncoder())

    def batch(self, gen: torch.Generator, n: int, device) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        seeds = torch.randint(0, EVAL_SEED, (n,), generator=gen).tolist()
        prompts = [sample_scene(s).caption for s in seeds]
        with torch.no_grad():
            cond = self.encoder.encode(prompts, warn=False)
        return cond.to(device), self._uncond.expand(n, -1, -1).to(device), prompts


class Embeddings:
    def __init__(self, path: str):
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            if not {"cond", "uncond"} <= keys:
                raise ValueError(f"{path} must hold 'cond' (P, L, 4096) and 'uncond' (1, L, 4096); it has {sorted(keys)}")
            self.cond, self.uncond_one = f.get_tensor("cond").float(), f.get_tensor("uncond").float()
        if self.cond.dim() != 3 or self.uncond_one.shape[1:] != self.cond.shape[1:]:
            raise ValueError(f"{path}: cond {tuple(self.cond.shape)} and uncond {tuple(self.uncond_one.shape)} "
                             "must be (P, L, C) and (1, L, C)")

    def batch(self, gen: torch.Generator, n: int, device):
        idx = torch.randint(0, self.cond.shape[0], (n,), generator=gen)
        return self.cond[idx].to(device), self.uncond_one.expand(n, -1, -1).to(device), [f"#{i}" for i in idx.tolist()]
