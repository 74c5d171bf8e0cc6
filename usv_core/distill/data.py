"""Conditioning for distillation. DMD needs no videos: only what the student is asked for. For USV
World that is captions of random training scenes through the teacher's caption encoder; for a
real Wan checkpoint it is text-encoder outputs computed once elsewhere (umT5 is not part of this
package) and stored as safetensors: "cond" (P, L, 4096) and "uncond" (1, L, 4096).

DMD2's GAN term does need videos: RealClips renders USV World training clips and encodes them
once with the shipped VAE."""

from __future__ import annotations

import torch
from safetensors import safe_open

from ..world.evaluate import EVAL_SEED, autocast, to_video
from ..world.scene import make_batch, sample_scene
from ..world.text import CaptionEncoder
from ..world.vae import WanVAE, latent_norm
from ..world.weights import load_text


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor onto the device without waiting for the GPU: a plain copy from pageable
    memory synchronises the stream, and a step makes dozens of them."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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
        return to_device(cond, device), to_device(self._uncond, device).expand(n, -1, -1), prompts


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
        return (to_device(self.cond[idx], device), to_device(self.uncond_one, device).expand(n, -1, -1),
                [f"#{i}" for i in idx.tolist()])


class RealClips:
    """n training clips (seeds below EVAL_SEED) as the DiT sees them: rendered, encoded by the VAE,
    normalised as ComfyUI's Wan21 latent format does; each with its caption's conditioning.
    Drawn from gen, so a resumed run rebuilds the same set instead of storing it."""

    def __init__(self, vae: WanVAE, captions: WorldCaptions, n: int, frames: int, size: int, gen: torch.Generator,
                 device, chunk: int = 16, progress=None):
        seeds = torch.randint(0, EVAL_SEED, (n,), generator=gen).tolist()
        vae = vae.to(device)
        latents, prompts = [], []
        with torch.no_grad():
            for i in range(0, n, chunk):
                clips, caps = make_batch(seeds[i : i + chunk], size=size, frames=frames, device=device)
                with autocast(torch.device(device)):
                    z = vae.encode(to_video(clips)).float()
                latents.append(latent_norm(z).to(torch.bfloat16))
                prompts += caps
                if progress:
                    progress(len(prompts), n)
            self.cond = captions.encoder.encode(prompts, warn=False).to(device)
        self.latents = torch.cat(latents)

    def __len__(self) -> int:
        return self.latents.shape[0]

    def batch(self, gen: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = to_device(torch.randint(0, len(self), (n,), generator=gen), self.latents.device)
        return self.latents[idx].float(), self.cond[idx]
