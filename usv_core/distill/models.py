"""The three networks of DMD2, all Wan-layout DiTs: the frozen teacher (real score), the fake-score
network and the student, both initialised from the teacher. A teacher file is any Wan 2.1 t2v
safetensors: USV World's, or a real checkpoint as ComfyUI keeps it (keys with or without the
"model.diffusion_model." prefix)."""

from __future__ import annotations

import torch
from safetensors import safe_open

from ..world.dit import HEAD_DIM, WanDiT
from ..world.weights import dit_config
from .gan import fake_score_from
from .student import SparseWanDiT

PREFIXES = ("model.diffusion_model.", "diffusion_model.")


def read_wan_state(path: str) -> dict[str, torch.Tensor]:
    with safe_open(path, framework="pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    for prefix in PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            break
    if "head.modulation" not in sd or "blocks.0.ffn.0.weight" not in sd:
        raise ValueError(f"{path} is not a Wan 2.1 text-to-video DiT (no head.modulation / blocks.0.ffn.0.weight); "
                         "give --teacher a Wan 2.1 t2v safetensors file such as models/diffusion_models/usv_world_dit.safetensors")
    if "img_emb.proj.0.weight" in sd:
        raise ValueError(f"{path} is a Wan image-to-video model; this recipe distils text-to-video DiTs")
    return sd


def wan_from_state(sd: dict[str, torch.Tensor], cls=WanDiT) -> WanDiT:
    cfg = dit_config(sd)
    if cfg["dim"] % HEAD_DIM:
        raise ValueError(f"dim {cfg['dim']} is not a multiple of {HEAD_DIM} (Wan's head dim)")
    model = cls(**cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    if missing or unexpected:
        raise ValueError(f"teacher weights do not fit the Wan 2.1 layout: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return model


def tiny_teacher(seed: int = 0, layers: int = 3) -> WanDiT:
    """A random Wan DiT for smoke tests: weights away from the zero init, so every path carries signal."""
    gen = torch.Generator().manual_seed(seed)
    model = WanDiT(dim=128, ffn_dim=256, num_layers=layers)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def build(teacher_sd: dict[str, torch.Tensor] | None, seed: int = 0, tiny_layers: int = 3, gan: bool = False):
    """(teacher, fake, student), on the CPU in float32; the teacher frozen. With gan the fake
    network carries DMD2's classifier (gan.FakeScore)."""
    teacher = wan_from_state(teacher_sd) if teacher_sd is not None else tiny_teacher(seed, tiny_layers)
    teacher.requires_grad_(False).eval()
    fake = fake_score_from(teacher, seed) if gan else wan_from_state(teacher.state_dict())
    student = wan_from_state(teacher.state_dict(), cls=SparseWanDiT)
    return teacher, fake.train(), student.train()
