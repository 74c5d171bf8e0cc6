"""Saving and loading the world model's three safetensors files. Configurations are read back from
tensor shapes, as ComfyUI's loaders do, so the files carry no separate config."""

from __future__ import annotations

import os
import re

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .dit import HEAD_DIM, WanDiT
from .text import CaptionEncoder
from .vae import WanVAE

# Laid out like ComfyUI's own models folder, so that the pack can add each as a search path.
MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "models")
DIT_FILE = os.path.join("diffusion_models", "usv_world_dit.safetensors")
VAE_FILE = os.path.join("vae", "usv_world_vae.safetensors")
TEXT_FILE = os.path.join("text_encoders", "usv_world_text.safetensors")


def default_path(name: str) -> str:
    return os.path.join(MODELS_DIR, name)


def _save(module: torch.nn.Module, path: str, dtype: torch.dtype, metadata: dict[str, str] | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(tensors, path, metadata=metadata)


def _load(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def save_dit(model: WanDiT, path: str, dtype: torch.dtype = torch.bfloat16) -> None:
    _save(model, path, dtype, {"format": "wan2.1-t2v", "dim": str(model.dim)})


def dit_config(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    layers = {int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m}
    return {
        "dim": sd["head.modulation"].shape[-1],
        "ffn_dim": sd["blocks.0.ffn.0.weight"].shape[0],
        "num_layers": len(layers),
        "in_dim": sd["patch_embedding.weight"].shape[1],
        "out_dim": sd["head.head.weight"].shape[0] // 4,
    }


def load_dit(path: str | None = None, device="cpu", dtype: torch.dtype = torch.float32) -> WanDiT:
    sd, _ = _load(path or default_path(DIT_FILE))
    cfg = dit_config(sd)
    assert cfg["dim"] % HEAD_DIM == 0
    model = WanDiT(**cfg)
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device, dtype).eval()


def save_vae(model: WanVAE, path: str, dtype: torch.dtype = torch.float16) -> None:
    _save(model, path, dtype, {"format": "wan2.1-vae", "dim": str(model.dim)})


def load_vae(path: str | None = None, device="cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    sd, _ = _load(path or default_path(VAE_FILE))
    model = WanVAE(dim=sd["decoder.head.0.gamma"].shape[0])
    model.load_state_dict({k: v.float() for k, v in sd.items()})
    return model.to(device, dtype).eval()


def save_text(model: CaptionEncoder, path: str, dtype: torch.dtype = torch.float16) -> None:
    _save(model, path, dtype, model.metadata())


def load_text(path: str | None = None, device="cpu") -> CaptionEncoder:
    sd, meta = _load(path or default_path(TEXT_FILE))
    return CaptionEncoder.from_state(sd, meta).to(device)
