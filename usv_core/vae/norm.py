"""RMS norm (+ bias, + SiLU) of the Wan VAE on channels-last tensors: the PyTorch reference and
the dispatch to the Triton kernel (triton_rms_silu.py)."""

from __future__ import annotations

import os

import torch

EPS = 1e-12  # F.normalize's eps, which ComfyUI's RMS_norm uses


def _triton_ok(x: torch.Tensor) -> bool:
    if not (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or a broken install: the reference serves
        return False
    return True


def rows(x: torch.Tensor) -> torch.Tensor:
    """(1, C, T, H, W) channels_last_3d (or (N, C, H, W) channels_last) -> a (voxels, C) view."""
    c = x.shape[1]
    perm = (0, *range(2, x.ndim), 1)
    try:
        return x.permute(perm).view(-1, c)
    except RuntimeError as e:
        raise ValueError(f"rms_norm needs channel-contiguous voxels in one block (channels_last memory, batch 1), "
                         f"got shape {tuple(x.shape)} strides {x.stride()}") from e


def reference(x2d: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None, silu: bool) -> torch.Tensor:
    """The definition, in float32: silu?((x + bias) / max(||x + bias||, eps) * gamma)."""
    y = x2d.float()
    if bias is not None:
        y = y + bias.float()
    y = y / y.norm(dim=1, keepdim=True).clamp_min(EPS) * gamma.float()
    return torch.nn.functional.silu(y) if silu else y


def rms_norm(x2d: torch.Tensor, gamma: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = True,
             out: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """Normalise each row of x2d (rows, C) over its C channels; gamma already holds sqrt(C).
    out (rows, C) may be any view whose rows are channel-contiguous. backend: auto (Triton on
    CUDA, the reference elsewhere), triton (also on the CPU under TRITON_INTERPRET=1), torch."""
    if x2d.ndim != 2 or x2d.stride(1) != 1:
        raise ValueError(f"rms_norm takes (rows, C) with contiguous channels, got {tuple(x2d.shape)} {x2d.stride()}")
    n, c = x2d.shape
    if gamma.shape != (c,) or (bias is not None and bias.shape != (c,)):
        raise ValueError(f"gamma and bias must be ({c},), got {tuple(gamma.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    if out is None:
        out = torch.empty_like(x2d)
    if out.shape != x2d.shape or out.stride(1) != 1:
        raise ValueError(f"out must be {tuple(x2d.shape)} with contiguous channels, got {tuple(out.shape)} {out.stride()}")
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"backend must be auto, triton or torch, got {backend!r}")
    use_triton = backend == "triton" or (backend == "auto" and x2d.is_cuda and _triton_ok(x2d))
    if use_triton and not _triton_ok(x2d):
        raise ValueError("backend='triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on the CPU)")
    if not use_triton:
        out.copy_(reference(x2d, gamma, bias, silu))
        return out
    if n == 0:
        return out
    import triton

    from .triton_rms_silu import rms_silu_kernel

    block_c = triton.next_power_of_2(c)
    block_r = max(1, min(64, 8192 // block_c))
    g = gamma.float().contiguous()
    b = bias.contiguous() if bias is not None else g  # never read without HAS_BIAS
    rms_silu_kernel[(triton.cdiv(n, block_r),)](
        x2d, b, g, out, n, c, x2d.stride(0), out.stride(0), EPS,
        HAS_BIAS=bias is not None, SILU=bool(silu), BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return out
