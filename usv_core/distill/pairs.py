"""DMD's regression term (Yin et al. 2024, the first DMD): pairs of noise and the frozen teacher's
sample from that noise (its own sampler: Euler steps with CFG), made once at the start. The
student's first step from the same noise is pulled towards the teacher's sample; with
`--regress-at all` every step of the schedule is, from the teacher's own state at that step's
sigma on the way there (as CausVid starts its few-step students from the teacher's ODE).

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

from ..world.sampling import sigmas as teacher_sigmas
from .data import to_device
from .losses import guided_velocity, x0_from_velocity


@torch.no_grad()
def teacher_solve(teacher, cond, uncond, z, *, steps: int, cfg: float, record=()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The teacher's Euler solve from noise z on its own schedule (ComfyUI's: shift 8, `steps`
    steps), with the sigmas in `record` added as nodes -> (its state at each of them, the sample)."""
    grid = teacher_sigmas(steps).tolist()
    for r in record:
        if all(abs(g - r) > 1e-6 for g in grid):
            grid.append(r)
    grid.sort(reverse=True)
    states, x = {}, z
    for s, s_next in zip(grid, grid[1:] + [None]):
        for r in record:
            if abs(s - r) <= 1e-6:
                states[r] = x
        if s_next is None:
            break
        v = guided_velocity(teacher, x, torch.full((x.shape[0],), s, device=x.device), cond, uncond, cfg)
        x = x + (s_next - s) * v.to(x.dtype)
    return [states[r] for r in record], x


class TeacherPairs:
    """n pairs: the teacher's states at sigmas_at (the first is 1: the noise itself), its sample,
    and the conditioning."""

    def __init__(self, teacher, captions, n: int, latent_shape, gen: torch.Generator, noise_gen: torch.Generator,
                 device, *, sigmas_at, steps: int, cfg: float, autocast, chunk: int = 64, progress=None):
        # stored in bf16 on a GPU (where the networks compute in bf16 anyway): 2048 USV World pairs
        # of the first step take 0.9 GB
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        self.sigmas_at = list(sigmas_at)
        states, target, conds = [], [], []
        for i in range(0, n, chunk):
            m = min(chunk, n - i)
            cond, uncond, _ = captions.batch(gen, m, device)
            z = torch.randn((m, *latent_shape), generator=noise_gen, device=device)
            with autocast():
                at, x0 = teacher_solve(teacher, cond, uncond, z, steps=steps, cfg=cfg, record=self.sigmas_at)
            states.append(torch.stack([x.float() for x in at], 1).to(dtype))
            target.append(x0.float().to(dtype))
            conds.append(cond.to(dtype))
            if progress:
                progress(i + m, n)
        self.states, self.target, self.cond = torch.cat(states), torch.cat(target), torch.cat(conds)

    def __len__(self) -> int:
        return self.states.shape[0]

    def batch(self, gen: torch.Generator, n: int):
        """(the teacher's states (n, steps, ...), its samples, conditioning) of n pairs drawn with gen."""
        idx = to_device(torch.randint(0, len(self), (n,), generator=gen), self.states.device)
        return self.states[idx].float(), self.target[idx].float(), self.cond[idx].float()


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
