"""DMD2's losses for flow-matching models, in Wan's convention: x_s = (1 - s) x0 + s noise, the
network gets timestep 1000 s and predicts the velocity noise - x0, so x0 = x_s - s v.

- The student is a few-step generator: its sample at step k of the schedule is the x0 it predicts
  from the noisy input it would meet there (backward simulation: the earlier steps are run with
  the student itself, without gradients, re-noised the stochastic DMD way).
- Distribution matching: re-noise the student's x0 to a random s, ask the frozen teacher (with
  CFG) and the fake-score network for their x0; the KL's gradient with respect to the sample is
  (fake - real), normalised per sample by |x0 - real| (DMD's weighting). A surrogate MSE against
  the stop-gradient target x0 - grad gives exactly that gradient.
- The fake-score network learns the student's distribution by flow matching on its samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dmd import flow_renoise


def x0_from_velocity(x_s: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return x_s - _b(s, x_s) * v


def _b(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noised(x0: torch.Tensor, noise: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return (1 - _b(s, x0)) * x0 + _b(s, x0) * noise


def guided_velocity(model, x_s, s, cond, uncond, cfg: float) -> torch.Tensor:
    """The teacher's velocity with classifier-free guidance, cond and uncond in one batch."""
    t = s * 1000.0
    if uncond is None or cfg == 1.0:
        return model(x_s, t, cond)
    v_c, v_u = model(torch.cat([x_s, x_s]), torch.cat([t, t]), torch.cat([cond, uncond])).chunk(2)
    return v_u + cfg * (v_c - v_u)


@dataclass
class StudentDraw:
    """Randomness of one student sample, drawn up front so that a step is a pure function of its seed."""

    noise: list[torch.Tensor]  # noise[0] is the start; noise[i] re-noises to sigma i (i >= 1)
    step: int  # the schedule step whose output is trained


def student_sample(student, draw: StudentDraw, sigmas: list[float], cond, sparsity_at, grad: bool) -> torch.Tensor:
    """x0 the student produces at schedule step draw.step, from the inputs sampling would give it.
    sparsity_at(i) is the Sparsity of step i (dense_steps make the first steps dense)."""
    x = draw.noise[0]
    b = x.shape[0]
    for i in range(draw.step + 1):
        s = torch.full((b,), sigmas[i], device=x.device)
        last = i == draw.step
        with torch.set_grad_enabled(grad and last):
            v = student(x, s * 1000.0, cond, sparsity_at(i))
            x0 = x0_from_velocity(x, s, v.to(x.dtype))
        if last:
            return x0
        x = flow_renoise(x0, draw.noise[i + 1], sigmas[i + 1])
    raise AssertionError("unreachable")


def dmd_gradient(teacher, fake, x0, noise, s, cond, uncond, cfg: float) -> tuple[torch.Tensor, dict]:
    """(fake - real) / mean|x0 - real| per sample: the distribution-matching direction (no grad),
    and stats as 0-d tensors (read at the end of the step: a read here would stall the GPU's queue)."""
    with torch.no_grad():
        x_s = noised(x0, noise, s)
        real = x0_from_velocity(x_s, s, guided_velocity(teacher, x_s, s, cond, uncond, cfg).to(x0.dtype))
        fake_x0 = x0_from_velocity(x_s, s, fake(x_s, s * 1000.0, cond).to(x0.dtype))
        weight = (x0 - real).abs().mean(dim=tuple(range(1, x0.dim())), keepdim=True).clamp_min(1e-6)
        grad = torch.nan_to_num((fake_x0 - real) / weight)
        stats = {"real_gap": (x0 - real).abs().mean(), "fake_gap": (fake_x0 - real).abs().mean()}
    return grad, stats


def dmd_loss(x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Surrogate whose gradient in x0 is grad / numel: 0.5 * mean((x0 - sg(x0 - grad))^2)."""
    target = (x0 - grad).detach()
    return 0.5 * F.mse_loss(x0.float(), target.float())


def velocity_loss(v: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Flow matching's loss: the velocity noise - x0 of x_s = (1 - s) x0 + s noise."""
    return F.mse_loss(v.float(), (noise - x0).float())


def fake_score_loss(fake, x0, noise, s, cond) -> torch.Tensor:
    """Flow matching on the student's samples (x0 carries no gradient)."""
    x0 = x0.detach()
    return velocity_loss(fake(noised(x0, noise, s), s * 1000.0, cond), x0, noise)
