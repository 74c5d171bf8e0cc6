"""Public entries: vsa_attention, vsa_attention_blocked, block_sparse_attention, supports.

Dispatch: CUDA tensors run the Triton kernels, anything else the PyTorch reference (which is the
definition). `backend="reference"` forces the reference anywhere; `backend="triton"` forces the
kernels, also on CPU tensors when TRITON_INTERPRET=1 (how the CPU tests check kernel logic).
"""

from __future__ import annotations

import math
import os
import warnings

import torch

from ..tiling import BlockLayout, blocked_layout, check_triple, cube_tiling, next_block
from . import ops
from .reference import block_sparse_reference, coarse_scores, pool_blocks, vsa_reference

__all__ = ["vsa_attention", "vsa_attention_blocked", "block_sparse_attention", "supports", "missing_triton_note",
           "TRITON_DTYPES", "TRITON_HEAD_DIMS", "TRITON_MAX_BLOCK"]

TRITON_DTYPES = (torch.bfloat16, torch.float16)
TRITON_HEAD_DIMS = (64, 128)
TRITON_MAX_BLOCK = 128  # tokens per block tile: a 4x4x4 cube uses 64

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    return True


def missing_triton_note() -> str | None:
    """On a CUDA machine without a usable triton, what runs instead; None otherwise."""
    if not torch.cuda.is_available() or _triton_importable():
        return None
    return ("triton is not installed (or does not import), so sparse attention runs dense on the GPU; "
            "token merging and the DMD sampler still work. Install triton to get the sparse kernels "
            "(Linux: pip install triton; Windows: pip install triton-windows).")


def supports(q: torch.Tensor, cube=(4, 4, 4), block_sizes=None):
    """Whether the Triton kernels serve attention on q: (True, "") or (False, reason).

    False means vsa_attention would run the slow reference (non-CUDA device, no triton) or raise
    (CUDA tensors of a dtype or head dim the kernels lack): a caller such as the ComfyUI node
    should then use dense attention instead.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        return False, "q must be a (B, heads, N, D) tensor"
    if not q.is_cuda:
        return False, f"device {q.device.type}: the kernels need CUDA (the reference would run)"
    if not _triton_importable():
        return False, "triton is not importable"
    if q.dtype not in TRITON_DTYPES:
        return False, f"dtype {q.dtype}: the kernels take bfloat16 or float16"
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        return False, f"head dim {q.shape[-1]}: the kernels take {TRITON_HEAD_DIMS}"
    vol = math.prod(int(c) for c in cube)
    if next_block(vol) > TRITON_MAX_BLOCK:
        return False, f"cube {tuple(cube)} holds {vol} tokens: the kernels take at most {TRITON_MAX_BLOCK}"
    return True, ""


def _check_qkv(q, k, v):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, heads, N, D), got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but q has {tuple(q.shape)}: q, k, v must match")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if not q.dtype.is_floating_point:
        raise ValueError(f"q must be a floating-point tensor, got {q.dtype}")


def _resolve_backend(backend, q, block):
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}")
    if backend == "reference" or (backend == "auto" and not q.is_cuda):
        return "reference"
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    if not _triton_importable():
        if backend == "triton":
            raise ValueError("backend='triton' but triton is not importable")
        _warn_once("usv_core: triton is not importable; VSA runs the slow PyTorch reference")
        return "reference"
    if q.dtype not in TRITON_DTYPES:
        raise ValueError(f"q: dtype {q.dtype} is not supported by the Triton kernels (bfloat16, float16); "
                         "check supports(q) or pass backend='reference'")
    if q.shape[-1] not in TRITON_HEAD_DIMS:
        raise ValueError(f"q: head dim {q.shape[-1]} is not supported by the Triton kernels {TRITON_HEAD_DIMS}; "
                         "check supports(q) or pass backend='reference'")
    if block > TRITON_MAX_BLOCK:
        raise ValueError(f"cube / block_sizes: blocks of up to {block} tokens exceed the kernels' "
                         f"{TRITON_MAX_BLOCK}-token tile")
    return "triton"


def _keep_counts(keep, B, H, C, device):
    """keep ratio(s) -> ((B, heads) int32 kept key blocks per query block, their max)."""
    # the epsilon keeps ratios like 0.1 * 30 (= 3.0000000000000004 in binary) from rounding up
    if isinstance(keep, bool):
        raise ValueError(f"keep must be a float in (0, 1] or a tensor of ratios, got {keep!r}")
    if isinstance(keep, (int, float)):
        kf = float(keep)
        if not (0.0 < kf <= 1.0):
            raise ValueError(f"keep must be in (0, 1], got {keep!r}")
        n = max(1, min(C, math.ceil(kf * C - 1e-6)))
        return torch.full((B, H), n, dtype=torch.int32, device=device), n
    if not isinstance(keep, torch.Tensor):
        raise ValueError(f"keep must be a float in (0, 1] or a tensor of ratios, got {type(keep).__name__}")
    on_host = keep.device.type == "cpu"
    # Ratios that live on the host (a policy's decisions) are checked and counted there: the
    # kernels then get their counts without a device sync.
    kt = keep.detach().to(device="cpu" if on_host else device, dtype=torch.float64)
    if kt.dim() == 0:
        kt = kt.expand(B, H)
    elif kt.dim() == 1 and kt.shape[0] == H:
        kt = kt[None, :].expand(B, H)
    elif kt.dim() == 2 and kt.shape[1] == H and kt.shape[0] in (1, B):
        kt = kt.expand(B, H)
    else:
        raise ValueError(f"keep must be a float, a (heads,) or a (B, heads) tensor; got shape {tuple(keep.shape)} "
                         f"for B={B}, heads={H}")
    n = torch.clamp(torch.ceil(kt * C - 1e-6), 1, C)
    bad = ~((kt > 0) & (kt <= 1))  # NaN is bad too
    # on the device, one host sync: validity and the list width together
    nbad, kmax = (int(x) for x in torch.stack([bad.sum().double(), n.max()]).tolist())
    if nbad:
        raise ValueError("keep ratios must all be in (0, 1]")
    counts = n.to(torch.int32).contiguous()
    if on_host and torch.device(device).type != "cpu":
        counts = counts.pin_memory().to(device, non_blocking=True)
    return counts, kmax


def _last_dim_contiguous(t):
    # the kernels take any batch/head strides but need unit stride along D, and address the rows
    # of one (batch, head) with 32-bit offsets
    if t.stride(-1) != 1 or t.stride(2) * t.shape[2] >= 2**31:
        return t.contiguous()
    return t


def _vsa(q, k, v, layout: BlockLayout, keep, gate, scale, return_stats, backend):
    B, H, N, D = q.shape
    C = layout.num_blocks
    scale = D ** -0.5 if scale is None else float(scale)
    counts, kmax = _keep_counts(keep, B, H, C, q.device)
    if _resolve_backend(backend, q, layout.block) == "reference":
        return vsa_reference(q, k, v, layout, counts, gate=gate, scale=scale, return_stats=return_stats)

    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    tensors = (q, k, v) + ((gate,) if isinstance(gate, torch.Tensor) else ())
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    # when gradients are wanted the coarse branch is built from differentiable torch ops below
    with_coarse = gate is not None and not need_grad
    with_rows = not need_grad and ops.kv_source(q.device) != "table"
    args = (q.detach(), k.detach(), v.detach(), layout.token_table, layout.block_sizes, counts.view(-1),
            kmax, layout.block, True, scale, with_coarse, return_stats)
    try:
        idx, cnt, coarse, ent, k_rows, v_rows = ops.select(*args, with_rows)
    except torch.OutOfMemoryError:
        if not with_rows:
            raise
        # the block-ordered copies are one more K and V: where they do not fit, gather through the table
        _warn_once("usv_core: no memory for VSA's block-ordered key copies; reading keys through the "
                   "token table instead (the same result, a little slower)")
        with_rows = False
        idx, cnt, coarse, ent, k_rows, v_rows = ops.select(*args, with_rows)
    out = ops.attend(q, k, v, idx, cnt, layout.token_table, layout.block_sizes, layout.block, True, scale,
                     (k_rows, v_rows) if with_rows else None)
    if gate is not None:
        if need_grad:
            coarse = torch.softmax(coarse_scores(q, k, layout, scale), -1) @ pool_blocks(v, layout)
        coarse_tok = coarse[:, :, layout.block_of_token]
        out = (out + gate * coarse_tok.to(out.dtype)).to(q.dtype)
    if return_stats:
        return out, ops.entropy_from_blocks(ent, C)
    return out


def vsa_attention(q, k, v, grid, keep, cube=(4, 4, 4), gate=None, scale=None, *,
                  return_stats: bool = False, backend: str = "auto", pack_edges: bool = True):
    """Video Sparse Attention over a (T, H, W) token grid; q, k, v (B, heads, N, D) in raster order.

    keep: float in (0, 1], or a (heads,) / (B, heads) tensor of ratios; each query block attends
    the max(1, ceil(keep * num_blocks)) key blocks of highest coarse score; keep=1 is dense.
    gate: optional, broadcastable to the output: out = fine + gate * coarse.
    return_stats: also return h (B, heads), the normalised entropy of the coarse attention.
    pack_edges: blocks are cubes, with runs of partial edge cubes along w joined into blocks of
    at most one cube's volume (usv_core.tiling); False gives one block per cube, the tiling VSA
    checkpoints were trained with.
    Returns (B, heads, N, D) in raster order (and h when return_stats).
    """
    _check_qkv(q, k, v)
    g = check_triple("grid", grid)
    if math.prod(g) != q.shape[2]:
        raise ValueError(f"grid {g} holds {math.prod(g)} tokens but q has N={q.shape[2]}")
    tiling = cube_tiling(g, cube, q.device)
    layout = tiling.packed if pack_edges else tiling.layout
    return _vsa(q, k, v, layout, keep, gate, scale, return_stats, backend)


def vsa_attention_blocked(q, k, v, block_sizes, keep, gate=None, scale=None, *,
                          return_stats: bool = False, backend: str = "auto"):
    """VSA over a sequence already grouped by cube (e.g. after token merging).

    block_sizes: 1-D int tensor, block i = the next block_sizes[i] tokens; sum must equal N.
    The real tokens of a block are exactly its block_sizes[i] tokens; otherwise as vsa_attention.
    """
    _check_qkv(q, k, v)
    try:
        layout = blocked_layout(block_sizes, device=q.device)
    except ValueError as e:
        raise ValueError(f"block_sizes: {e}") from None
    if layout.num_tokens != q.shape[2]:
        raise ValueError(f"block_sizes sum to {layout.num_tokens} but q has N={q.shape[2]}")
    return _vsa(q, k, v, layout, keep, gate, scale, return_stats, backend)


def block_sparse_attention(q, k, v, block_index, block_count, block_sizes=None, block_size=64,
                           scale=None, *, backend: str = "auto"):
    """Kernel-level entry: attention of each query block over its listed key blocks.

    q, k, v: (B, heads, N, D), already grouped block after block (cube order).
    block_index: (B, heads, num_blocks, kmax) int key-block ids, the first block_count of each
    row valid (ascending order reads memory best); block_count: (B, heads, num_blocks) int >= 1.
    Blocks: block_sizes (1-D, variable sizes) or else consecutive runs of block_size tokens
    (the last one may be short).
    """
    _check_qkv(q, k, v)
    B, H, N, D = q.shape
    uniform = block_sizes is None
    if uniform:
        bs = int(block_size)
        if bs <= 0:
            raise ValueError(f"block_size must be positive, got {block_size!r}")
        nb = -(-N // bs)
        block_sizes = torch.clamp(N - torch.arange(nb, device=q.device) * bs, max=bs)
    layout = blocked_layout(block_sizes, device=q.device)
    if layout.num_tokens != N:
        raise ValueError(f"block_sizes sum to {layout.num_tokens} but q has N={N}")
    nb = layout.num_blocks
    if not isinstance(block_index, torch.Tensor) or block_index.dim() != 4 or tuple(block_index.shape[:3]) != (B, H, nb):
        raise ValueError(f"block_index must be (B, heads, num_blocks={nb}, kmax)")
    if not isinstance(block_count, torch.Tensor) or tuple(block_count.shape) != (B, H, nb):
        raise ValueError(f"block_count must be (B, heads, num_blocks={nb})")
    scale = D ** -0.5 if scale is None else float(scale)
    if _resolve_backend(backend, q, layout.block) == "reference":
        return block_sparse_reference(q, k, v, block_index, block_count, layout, scale)
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    idx = block_index.to(device=q.device, dtype=torch.int32).contiguous()
    cnt = block_count.to(device=q.device, dtype=torch.int32).contiguous()
    # full power-of-two blocks need no table: rows are block * BLOCK + slot
    padded = uniform and layout.block == int(block_size)
    return ops.attend(q, k, v, idx, cnt, layout.token_table, layout.block_sizes, layout.block,
                      not padded, scale)
