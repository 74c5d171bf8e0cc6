"""DMD2's GAN term: the fake-score network gets a classification branch that tells noised real
clips from noised student samples, and the student is also pulled towards what that branch calls
real. On USV World real clips cost nothing (the world renders them), so the student can learn
from the data the teacher was trained on and not only from the teacher, whose samples miss some
of the colour and motion that real clips always have.

The branch reads the fake network's tokens after its middle block (DMD2 reads the UNet's
bottleneck); it is part of the fake network, so FSDP2, the optimizer and the checkpoint treat it
as one of its layers. Both losses are the non-saturating ones of DMD2. Its inputs are noised at
the distribution-matching loss's levels, as in DMD2, so the student samples' logits come from the
fake score's own pass; --gan-shift gives it levels of its own, at the cost of one more pass to the
middle block per fake update."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..world.dit import WanDiT
from ..world.weights import dit_config
from .losses import noised, velocity_loss


class Classifier(nn.Module):
    """Tokens (B, N, dim) -> one logit per sample: a per-token MLP, averaged over tokens."""

    def __init__(self, dim: int, seed: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, 1))
        with torch.no_grad():  # from its own seed: a run and its resumption start from the same classifier
            self.mlp[0].weight.normal_(0.0, dim ** -0.5, generator=torch.Generator().manual_seed(seed))
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)  # starts undecided (logit 0), so the first steps pull nowhere
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(h.float())).mean(dim=(1, 2))


class FakeScore(WanDiT):
    """WanDiT whose forward can also classify. out: "velocity" (WanDiT's forward), "logit" (the
    classifier's logit only: the blocks after the tap are skipped) or "both" ((velocity, logit))."""

    OUTS = ("velocity", "logit", "both")

    def __init__(self, *args, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.tap = len(self.blocks) // 2  # after this block the tokens go to the classifier
        self.classifier = Classifier(self.dim, seed)

    def forward(self, x, timestep, context, out: str = "velocity"):
        if out not in self.OUTS:
            raise ValueError(f"out must be one of {self.OUTS}, got {out!r}")
        x, grid, e, e0, context, rope = self.embed(x, timestep, context)
        logit = None
        for i, block in enumerate(self.blocks):
            x = block(x, e0, rope, context)
            if out != "velocity" and i == self.tap:
                logit = self.classifier(x)
                if out == "logit":
                    return logit
        v = self.output(x, e, grid)
        return (v, logit) if out == "both" else v


def fake_score_from(model: WanDiT, seed: int = 0) -> FakeScore:
    """A FakeScore with model's weights and a fresh classifier."""
    sd = model.state_dict()
    fake = FakeScore(**dit_config(sd), seed=seed)
    missing, unexpected = fake.load_state_dict(sd, strict=False)
    if unexpected or any(not k.startswith("classifier.") for k in missing):
        raise ValueError(f"weights do not fit the fake-score network: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return fake


def discriminator_loss(logit_real: torch.Tensor, logit_fake: torch.Tensor) -> torch.Tensor:
    """Real clips towards 'real' (positive logits), student samples towards 'fake'."""
    return F.softplus(-logit_real).mean() + F.softplus(logit_fake).mean()


def generator_loss(logit_fake: torch.Tensor) -> torch.Tensor:
    """The student's samples towards what the classifier calls real."""
    return F.softplus(-logit_fake).mean()


def fake_update_losses(fake: FakeScore, x0, eps, s, cond, real_batch, levels=None):
    """The fake network's two losses: flow matching on the student's samples at (s, eps) (the fake
    score), and the classifier's on real clips (real_batch: latents, conditioning, s, eps) against
    the same samples, noised at levels = (s, eps) of its own or, when None, in the flow-matching
    pass. -> (flow matching, classifier, stats as 0-d tensors)."""
    x0 = x0.detach()
    if levels is None:
        v, logit_fake = fake(noised(x0, eps, s), s * 1000.0, cond, out="both")
    else:
        v = fake(noised(x0, eps, s), s * 1000.0, cond)
        s_c, eps_c = levels
        logit_fake = fake(noised(x0, eps_c, s_c), s_c * 1000.0, cond, out="logit")
    flow = velocity_loss(v, x0, eps)
    real, real_cond, real_s, real_eps = real_batch
    logit_real = fake(noised(real, real_eps, real_s), real_s * 1000.0, real_cond, out="logit")
    d = discriminator_loss(logit_real, logit_fake)
    stats = {"gan_d": d.detach(), "d_real": torch.sigmoid(logit_real.detach()).mean(),
             "d_fake": torch.sigmoid(logit_fake.detach()).mean()}
    return flow, d, stats


def student_gan_loss(fake: FakeScore, x0, eps, s, cond) -> torch.Tensor:
    """The generator's term, with gradients through the fake network into the student's x0."""
    return generator_loss(fake(noised(x0, eps, s), s * 1000.0, cond, out="logit"))
