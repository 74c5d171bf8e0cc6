"""Launch wrappers, torch.library custom ops and the autograd Function around the Triton kernels.

The custom ops (namespace `usv`) make the kernels opaque, shape-known nodes for torch.compile:
- usv::vsa_select  pooling + coarse scores + top-k lists (+ coarse output, + entropy per block)
- usv::bsa_fwd     block-sparse attention forward -> (out, lse)
- usv::bsa_bwd     its backward -> (dq, dk, dv)
`BlockSparseAttentionFn` is the autograd Function tying bsa_fwd to bsa_bwd.

Ops are registered for every device: on a CPU with TRITON_INTERPRET=1 the same kernels run in
Triton's interpreter, which is how the CPU test suite checks them.
"""


import importlib
import math
import os

import torch

_LOG2E = 1.4426950408889634
# the selection kernel keeps a whole score row in registers (up to 4 warps of 32 x 32 floats);
# beyond this many blocks selection falls back to torch (pooling and scores still run in Triton)
MAX_SELECT_BLOCKS = 4096

_FWD_CONFIG = {"num_warps": 4, "num_stages": 2, "KB": 1}  # H200 sweep: bench/attention.md
# How the forward reads key tiles when no gradient is wanted (select's pooling pass writes the
# block-ordered copies): "table" gathers rows of the raster tensors through the token table;
# "rows" reads the copies; "tma" reads them through tensor descriptors (compute capability 9+,
# "rows" elsewhere). H200, 1.3B keep 0.125 with selection: table 2.72 ms, rows 2.35, tma 2.31-2.35
# (bench/attention.md): rows, the portable one, since TMA's edge is within the run's noise.
# Training's forward keeps the table (its backward reads the raster tensors).
_FWD_KV = "rows"
_BWD_CONFIG = {"num_warps": 4, "num_stages": 3}
# the dk/dv kernel's own launch config where it differs from the dq kernel's (empty: the same);
# statically, dk/dv spills registers at 4 warps on every card and dq only off Hopper
# (bench/kernel_resources.py), so the sweep times them apart
_BWD_DKDV_CONFIG: dict = {}
_SCORE_PRECISION = None  # None: by device (_score_precision); the benchmark sets "ieee" or "tf32x3"


# Tests set this: kernel outputs then start as NaN (floats) or -7 (ints) instead of uninitialised
# memory, so any element a kernel fails to write shows up.
POISON_OUTPUTS = False


def _new(shape, dtype, device):
    if not POISON_OUTPUTS:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.full(shape, float("nan") if dtype.is_floating_point else -7, dtype=dtype, device=device)


def set_kernel_config(fwd=None, bwd=None, kv=None, bwd_dkdv=None):
    """Override launch parameters (num_warps, num_stages; KB = key blocks per forward step), the
    forward's key-tile source (kv: "table", "rows" or "tma") and the dk/dv kernel's own launch
    parameters (bwd_dkdv; {} clears them: it then takes bwd's); used by the benchmark's sweep."""
    global _FWD_KV
    if fwd:
        _FWD_CONFIG.update(fwd)
    if bwd:
        _BWD_CONFIG.update(bwd)
    if bwd_dkdv is not None:
        _BWD_DKDV_CONFIG.clear()
        _BWD_DKDV_CONFIG.update(bwd_dkdv)
    if kv is not None:
        if kv not in ("table", "rows", "tma"):
            raise ValueError(f"kv must be 'table', 'rows' or 'tma', got {kv!r}")
        _FWD_KV = kv


def kv_source(device) -> str:
    """The forward's key-tile source on this device (see _FWD_KV)."""
    if _FWD_KV == "tma" and torch.device(device).type == "cuda" and torch.cuda.get_device_capability(device)[0] < 9:
        return "rows"  # tensor descriptors need Hopper's copy engine
    return _FWD_KV


def _interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def _patch_interpreter():
    """Triton 3.6's interpreter turns scalars into Python ints with int(array); numpy >= 2.3
    refuses that for the 1-element arrays it holds, so any loop bounded by a loaded count fails.
    Only under TRITON_INTERPRET=1 (the CPU test suite); compiled kernels are untouched."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    from triton.runtime import interpreter as it

    if getattr(it, "_usv_index_patch", False):
        return
    original = it._patch_lang_tensor

    def patched(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    it._patch_lang_tensor = patched
    it._usv_index_patch = True


def _kernel_module(name: str):
    """One of the triton_*.py kernel modules, imported on first use (after the interpreter patch:
    triton is imported only where a kernel runs)."""
    _patch_interpreter()
    return importlib.import_module(f"{__package__}.triton_{name}")


def _empty(device):
    return torch.empty(0, dtype=torch.int32, device=device)


# ---------------------------------------------------------------------------------- selection
def _select_impl(q, k, v, table, sizes, counts, kmax, block, use_table, scale, with_coarse, with_stats, with_rows):
    pool_mod, scores_mod, select_mod = (_kernel_module(n) for n in ("pool", "scores", "select"))

    B, H, _, D = q.shape
    C = sizes.numel()
    dev = q.device
    qc = _new((B, H, C, D), torch.float32, dev)
    kc = _new((B, H, C, D), torch.float32, dev)
    vc = _new((B, H, C, D), torch.float32, dev) if with_coarse else qc
    rows_shape = (B * H, C * block, D) if with_rows else (0,)
    kr, vr = _new(rows_shape, q.dtype, dev), _new(rows_shape, q.dtype, dev)
    tab = table if use_table else _empty(dev)
    pool_mod.pool_kernel[(C, B * H)](
        q, k, v, qc, kc, vc, kr if with_rows else qc, vr if with_rows else qc, tab, sizes,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        H, C,
        HEAD_DIM=D, BLOCK=block, USE_TABLE=use_table, WITH_V=with_coarse, KV_ROWS=with_rows,
        num_warps=8 if block * D >= 8192 else 4,
    )
    idx = _new((B, H, C, kmax), torch.int32, dev)
    cnt = _new((B, H, C), torch.int32, dev)
    coarse = _new((B, H, C, D) if with_coarse else (0,), torch.float32, dev)
    ent = _new((B, H, C) if with_stats else (0,), torch.float32, dev)
    scores = _new((B, H, C, C), torch.float32, dev)
    scores_mod.scores_kernel[(_cdiv(C, 64), _cdiv(C, 64), B * H)](
        qc, kc, scores, C, scale, HEAD_DIM=D, BM=64, BN=64, BK=32, PRECISION=_score_precision(dev), num_warps=4,
    )
    cpad = max(32, _next_pow2(C))
    if cpad > MAX_SELECT_BLOCKS:
        # rows too wide for one program's registers: torch does what the kernel would (same tie rule)
        from .reference import select_blocks

        i2, c2 = select_blocks(scores, counts.view(B, H))
        idx[..., : i2.shape[-1]] = i2
        cnt.copy_(c2)
        if with_coarse:
            coarse.copy_(torch.softmax(scores, -1) @ vc)
        if with_stats:
            logp = torch.log_softmax(scores, -1)
            ent.copy_(-(logp.exp() * logp).nan_to_num(0.0).sum(-1))
        return idx, cnt, coarse, ent, kr, vr
    select_mod.select_kernel[(C, B * H)](
        scores, vc, idx, cnt, counts, ent if with_stats else qc, coarse if with_coarse else qc,
        C, kmax,
        HEAD_DIM=D, CPAD=cpad, VCH=16, WITH_COARSE=with_coarse, WITH_STATS=with_stats,
        num_warps=max(1, cpad // 1024),
    )
    return idx, cnt, coarse, ent, kr, vr


def _score_precision(device) -> str:
    """tf32x3 on tensor cores that have tf32 (Ampere and newer); IEEE float32 on the FMA units
    before that and in the interpreter."""
    if _SCORE_PRECISION is not None:
        return _SCORE_PRECISION
    if device.type != "cuda":
        return "ieee"
    return "tf32x3" if torch.cuda.get_device_capability(device)[0] >= 8 else "ieee"


def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a, b):
    return -(-int(a) // int(b))


# ---------------------------------------------------------------------------------- attention
def _fwd_impl(q, k, v, idx, cnt, table, sizes, block, use_table, scale, kv_rows=False):
    """kv_rows: k and v are select's block-ordered copies (batch*head, blocks * block, D)."""
    fwd_mod = _kernel_module("fwd")
    B, H, N, D = q.shape
    nqb = sizes.numel()
    o = _new(q.shape, q.dtype, q.device)
    lse = _new((B, H, N), torch.float32, q.device)
    tab = table if use_table else _empty(q.device)
    config = dict(_FWD_CONFIG)
    kd, vd, desc = k, v, False
    if kv_rows:
        config["KB"] = 1  # one contiguous slab per step
        desc = kv_source(q.device) == "tma"
        if desc:
            from triton.tools.tensor_descriptor import TensorDescriptor

            kd, vd = (TensorDescriptor.from_tensor(t.view(-1, D), [block, D]) for t in (k, v))
    fwd_mod.bsa_fwd_kernel[(nqb, B * H)](
        q, kd, vd, o, lse, idx, cnt, tab, sizes,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
        H, nqb, N, idx.shape[-1], scale * _LOG2E,
        HEAD_DIM=D, BLOCK=block, USE_TABLE=use_table, DOT_F32=_interpreting(), KV_ROWS=kv_rows, KV_DESC=desc,
        **config,
    )
    return o, lse


def transpose_lists(idx, cnt, num_blocks):
    """Per-query-block key lists -> per-key-block query lists, ascending (for dk/dv), with the
    order the dk/dv programs take the key blocks in: longest list first.
    Returns (qidx (B, H, C, C) int32, qcnt (B, H, C) int32, order (B, H, C) int32)."""
    tr = _kernel_module("transpose")
    B, H, C, kmax = idx.shape
    mask = torch.zeros((B, H, C, C), dtype=torch.int8, device=idx.device)
    tr.scatter_kernel[(C, B * H)](idx, cnt, mask, C, kmax, KPAD=_next_pow2(max(kmax, 16)), num_warps=1)
    qidx = _new((B, H, C, C), torch.int32, idx.device)
    qcnt = _new((B, H, C), torch.int32, idx.device)
    cpad = max(32, _next_pow2(C))
    tr.compact_kernel[(C, B * H)](mask, qidx, qcnt, C, CPAD=cpad, num_warps=max(1, min(8, cpad // 1024)))
    order = torch.argsort(qcnt, dim=-1, descending=True, stable=True).to(torch.int32)
    return qidx, qcnt, order


def _bwd_impl(do, q, k, v, o, lse, idx, cnt, table, sizes, block, use_table, scale):
    bwd_mod = _kernel_module("bwd")
    B, H, N, D = q.shape
    nb = sizes.numel()
    do = do.contiguous()
    o = o.contiguous()
    dq = _new(q.shape, q.dtype, q.device)
    dk = _new(q.shape, q.dtype, q.device)
    dv = _new(q.shape, q.dtype, q.device)
    delta = _new((B, H, N), torch.float32, q.device)
    tab = table if use_table else _empty(q.device)
    common = dict(HEAD_DIM=D, BLOCK=block, USE_TABLE=use_table, DOT_F32=_interpreting())
    strides = (
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        o.stride(0), o.stride(1), o.stride(2),
    )
    bwd_mod.bsa_bwd_dq_kernel[(nb, B * H)](
        q, k, v, o, do, dq, lse, delta, idx, cnt, tab, sizes, *strides,
        H, nb, N, idx.shape[-1], scale * _LOG2E, scale, **common, **_BWD_CONFIG,
    )
    qidx, qcnt, order = transpose_lists(idx, cnt, nb)
    bwd_mod.bsa_bwd_dkdv_kernel[(nb, B * H)](
        q, k, v, do, dk, dv, lse, delta, qidx, qcnt, order, tab, sizes, *strides,
        dk.stride(0), dk.stride(1), dk.stride(2),
        H, nb, N, qidx.shape[-1], scale * _LOG2E, scale, **common, **{**_BWD_CONFIG, **_BWD_DKDV_CONFIG},
    )
    return dq, dk, dv


# ---------------------------------------------------------------------------------- custom ops
def _register():
    """Define the usv:: ops once per process (the package may be imported under two names)."""
    ns = torch.ops.usv
    try:
        ns.bsa_fwd  # noqa: B018
        return
    except (AttributeError, RuntimeError):
        pass

    @torch.library.custom_op("usv::vsa_select", mutates_args=())
    def vsa_select(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, table: torch.Tensor,
                   sizes: torch.Tensor, counts: torch.Tensor, kmax: int, block: int, use_table: bool,
                   scale: float, with_coarse: bool, with_stats: bool, with_rows: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return _select_impl(q, k, v, table, sizes, counts, kmax, block, use_table, scale, with_coarse, with_stats,
                            with_rows)

    @vsa_select.register_fake
    def _(q, k, v, table, sizes, counts, kmax, block, use_table, scale, with_coarse, with_stats, with_rows=False):
        B, H, _, D = q.shape
        C = sizes.shape[0]
        rows = (B * H, C * block, D) if with_rows else (0,)
        return (
            q.new_empty((B, H, C, kmax), dtype=torch.int32),
            q.new_empty((B, H, C), dtype=torch.int32),
            q.new_empty((B, H, C, D) if with_coarse else (0,), dtype=torch.float32),
            q.new_empty((B, H, C) if with_stats else (0,), dtype=torch.float32),
            q.new_empty(rows),
            q.new_empty(rows),
        )

    @torch.library.custom_op("usv::bsa_fwd", mutates_args=())
    def bsa_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor,
                table: torch.Tensor, sizes: torch.Tensor, block: int, use_table: bool, scale: float,
                kv_rows: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        return _fwd_impl(q, k, v, idx, cnt, table, sizes, block, use_table, scale, kv_rows)

    @bsa_fwd.register_fake
    def _(q, k, v, idx, cnt, table, sizes, block, use_table, scale, kv_rows=False):
        B, H, N, _ = q.shape
        # contiguous, like the real outputs (empty_like would copy q's strides)
        return q.new_empty(q.shape), q.new_empty((B, H, N), dtype=torch.float32)

    @torch.library.custom_op("usv::bsa_bwd", mutates_args=())
    def bsa_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                lse: torch.Tensor, idx: torch.Tensor, cnt: torch.Tensor, table: torch.Tensor,
                sizes: torch.Tensor, block: int, use_table: bool, scale: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _bwd_impl(do, q, k, v, o, lse, idx, cnt, table, sizes, block, use_table, scale)

    @bsa_bwd.register_fake
    def _(do, q, k, v, o, lse, idx, cnt, table, sizes, block, use_table, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


_register()


class BlockSparseAttentionFn(torch.autograd.Function):
    """out = block-sparse attention(q, k, v) over the given lists; gradients for q, k, v."""

    @staticmethod
    def forward(ctx, q, k, v, idx, cnt, table, sizes, block, use_table, scale):
        o, lse = torch.ops.usv.bsa_fwd(q, k, v, idx, cnt, table, sizes, block, use_table, scale)
        ctx.save_for_backward(q, k, v, o, lse, idx, cnt, table, sizes)
        ctx.block, ctx.use_table, ctx.scale = block, use_table, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, idx, cnt, table, sizes = ctx.saved_tensors
        dq, dk, dv = torch.ops.usv.bsa_bwd(do, q, k, v, o, lse, idx, cnt, table, sizes,
                                           ctx.block, ctx.use_table, ctx.scale)
        return dq, dk, dv, None, None, None, None, None, None, None


def select(q, k, v, table, sizes, counts, kmax, block, use_table, scale, with_coarse, with_stats, with_rows=False):
    """-> (lists, counts, coarse output, entropy per block, block-ordered K copy, V copy); the
    copies are empty unless with_rows."""
    return torch.ops.usv.vsa_select(q, k, v, table, sizes, counts, kmax, block, use_table, scale,
                                    with_coarse, with_stats, with_rows)


def attend(q, k, v, idx, cnt, table, sizes, block, use_table, scale, kv_rows=None):
    """kv_rows: select's (K copy, V copy), read instead of k and v; forward only."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return BlockSparseAttentionFn.apply(q, k, v, idx, cnt, table, sizes, block, use_table, scale)
    if kv_rows is not None:
        return torch.ops.usv.bsa_fwd(q, *kv_rows, idx, cnt, table, sizes, block, use_table, scale, True)[0]
    return torch.ops.usv.bsa_fwd(q, k, v, idx, cnt, table, sizes, block, use_table, scale)[0]


def entropy_from_blocks(ent, num_blocks):
    """(B, H, C) per-block entropies -> (B, H) normalised mean."""
    if num_blocks <= 1:
        return ent.new_zeros(ent.shape[:2])
    return ent.mean(-1) / math.log(num_blocks)
