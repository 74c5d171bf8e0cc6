"""The student as files ComfyUI loads: a full Wan 2.1 t2v model (UNETLoader, from
models/diffusion_models) or a LoRA against its teacher (LoraLoaderModelOnly, from models/loras).

LoRA layout, as ComfyUI's loader reads it for Wan: "diffusion_model.<module>.lora_up.weight" /
".lora_down.weight" / ".alpha" for linear weights (the student-minus-teacher difference cut to
`rank` by SVD; alpha = rank, so strength 1 applies it as is), ".diff_b" for biases and ".diff" for
every other tensor that changed (norm weights, modulation tables, the patch-embedding conv), which
are small and kept exactly."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

PREFIX = "diffusion_model."


def _write(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.replace(tmp, path)


def save_full(student_sd: dict[str, torch.Tensor], path: str, recipe: dict | None = None,
              dtype: torch.dtype = torch.bfloat16) -> None:
    """Wan 2.1 key names with no prefix, as ComfyUI's own Wan files and USV World's DiT."""
    tensors = {k: v.detach().to("cpu", dtype) for k, v in student_sd.items()}
    dim = student_sd["head.modulation"].shape[-1]
    _write(tensors, path, {"format": "wan2.1-t2v", "dim": str(dim), "usv_distill": json.dumps(recipe or {})})


def lora_tensors(student_sd: dict[str, torch.Tensor], teacher_sd: dict[str, torch.Tensor], rank: int,
                 dtype: torch.dtype = torch.bfloat16) -> tuple[dict[str, torch.Tensor], float]:
    """The LoRA and the share of the weight difference's energy it keeps (1.0 at full rank)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    missing = set(student_sd) ^ set(teacher_sd)
    if missing:
        raise ValueError(f"student and teacher differ in tensors {sorted(missing)[:3]}: a LoRA needs the same architecture")
    out: dict[str, torch.Tensor] = {}
    kept, total = 0.0, 0.0
    for key, w in student_sd.items():
        delta = (w.detach().double().cpu() - teacher_sd[key].detach().double().cpu())
        energy = float(delta.square().sum())
        if energy == 0.0:
            continue
        total += energy
        if key.endswith(".weight") and delta.dim() == 2:
            base = PREFIX + key[: -len(".weight")]
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
            r = min(rank, s.numel())
            kept += float(s[:r].square().sum())
            out[base + ".lora_up.weight"] = (u[:, :r] * s[:r]).to(dtype)
            out[base + ".lora_down.weight"] = vh[:r].contiguous().to(dtype)
            out[base + ".alpha"] = torch.tensor(float(r))
        elif key.endswith(".bias"):
            out[PREFIX + key[: -len(".bias")] + ".diff_b"] = delta.to(dtype)
            kept += energy
        else:
            base = PREFIX + (key[: -len(".weight")] if key.endswith(".weight") else key)
            out[base + ".diff"] = delta.to(dtype)
            kept += energy
    return out, (kept / total if total else 1.0)


def save_lora(student_sd, teacher_sd, path: str, rank: int, recipe: dict | None = None) -> float:
    tensors, kept = lora_tensors(student_sd, teacher_sd, rank)
    _write(tensors, path, {"format": "usv-distill-lora", "rank": str(rank), "energy_kept": f"{kept:.6f}",
                           "usv_distill": json.dumps(recipe or {})})
    return kept
