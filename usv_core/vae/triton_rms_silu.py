"""RMS norm over channels (+ the previous conv's bias, + SiLU) on channel-contiguous rows.

One program normalises BLOCK_R rows of C channels: the Wan VAE's RMS_norm is
x / max(||x||, eps) * sqrt(C) * gamma over the channel axis, and in channels_last_3d memory the
channels of one voxel are contiguous, so a row is one voxel. Statistics in float32; the output
may be a strided view (the causal conv's input buffer after its cached frames), which is how the
norm writes its result where the next conv reads it instead of into a tensor that is copied there.
"""

import triton
import triton.language as tl


@triton.jit
def rms_silu_kernel(X, BIAS, GAMMA, OUT, rows, C, stride_x, stride_o, eps,
                    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_C)
    rmask = r < rows
    cmask = c < C
    mask = rmask[:, None] & cmask[None, :]
    r64 = r.to(tl.int64)
    x = tl.load(X + r64[:, None] * stride_x + c[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(BIAS + c, mask=cmask, other=0.0).to(tl.float32)
        x = tl.where(mask, x + b[None, :], 0.0)
    inv = 1.0 / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)
    g = tl.load(GAMMA + c, mask=cmask, other=0.0).to(tl.float32)  # gamma * sqrt(C), float32
    y = x * inv[:, None] * g[None, :]
    if SILU:
        y = y * tl.sigmoid(y)
    tl.store(OUT + r64[:, None] * stride_o + c[None, :], y.to(OUT.dtype.element_ty), mask=mask)
