"""DMD's regression term (Yin et al. 2024, the first DMD): pairs of noise and the frozen teacher's
sample from that noise (its own sampler: Euler steps with CFG), made once at the start. The
student's first step from the same noise is pulled towards the teacher's sample.

Distribution matching alone only asks that the student's samples be likely under the teacher;
on USV World it left the student's motion at half the teacher's and two runs of one recipe 0.1
apart. The pairs say which video each noise should become, which also holds the student to the
teacher's layout of colours and shapes.

The pairs are drawn from the run's seed, so a resumed run rebuilds the same set instead of storing
it. They cost the teacher's sampling once per pair: seconds for USV World on a GPU, hours for a
real Wan at 480p (there, make fewer)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..world.sampling import sample
from .data import to_device
from .losses import StudentDraw, student_sample


class TeacherPairs:
    def __init__(self, teacher, captions, n: int, latent_shape, gen: torch.Generator, noise_gen: torch.Generator,
                 device, *, steps: int, cfg: float, autocast, chunk: int = 64, progress=None):
        # stored in bf16 on a GPU (where the networks compute in bf16 anyway): 2048 USV World pairs take 0.9 GB
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        noise, target, conds = [], [], []
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            cond, uncond, _ = captions.batch(gen, m, device)
            z = torch.randn((m, *latent_shape), generator=noise_gen, device=device)
            with torch.no_grad(), autocast():
                x0 = sample(teacher, cond, uncond, z, steps=steps, cfg=cfg)
            noise.append(z.to(dtype))
            target.append(x0.float().to(dtype))
            conds.append(cond.to(dtype))
            if progress:
                progress(i + m, n)
        self.noise, self.target, self.cond = torch.cat(noise), torch.cat(target), torch.cat(conds)

    def __len__(self) -> int:
        return self.noise.shape[0]

    def batch(self, gen: torch.Generator, n: int):
        """(noise, the teacher's sample from it, conditioning) of n pairs drawn with gen."""
        idx = to_device(torch.randint(0, len(self), (n,), generator=gen), self.noise.device)
        return self.noise[idx].float(), self.target[idx].float(), self.cond[idx].float()


def regression_loss(student, noise, target, cond, sigmas, sparsity_at) -> torch.Tensor:
    """Mean squared error of the student's first-step x0 from the pairs' noise against the
    teacher's samples (latent space: USV World's VAE has no perceptual loss to borrow)."""
    x0 = student_sample(student, StudentDraw([noise], 0), sigmas, cond, sparsity_at, grad=True)
    return F.mse_loss(x0.float(), target)
