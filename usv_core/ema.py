"""An exponential moving average of a network's weights, as both training recipes keep it
(usv_core.world.train for the teacher, usv_core.distill for the student)."""

from __future__ import annotations

import torch


def ema_update(averages: list[torch.Tensor], params: list[torch.Tensor], decay: float, step: int) -> None:
    """averages <- decay' averages + (1 - decay') params, in place. decay' = min(decay, (1 + step) /
    (10 + step)) ramps up over the first steps, so that the average soon forgets the initial weights."""
    ramped = min(decay, (1 + step) / (10 + step))
    with torch.no_grad():
        torch._foreach_lerp_(averages, params, 1.0 - ramped)
