"""Cube pooling: the mean of q, k (and v) over the real tokens of every block.

One program per (block, batch*head) reads the block's rows through the token table, so raster
tensors are pooled without a reorder; q, k and v are pooled in the same launch. Rows are summed
16 at a time: a whole 64 x 128 tile per input held ~230 registers a thread, which starved this
memory-bound kernel of resident warps.
"""

import triton
import triton.language as tl


@triton.jit
def _pool_one(X, OUT, TAB, SIZES, size, inv_size, b, h, c, H, C,
              stride_xb, stride_xh, stride_xn,
              HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TABLE: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, 16)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    acc = tl.zeros([16, HEAD_DIM], tl.float32)
    for r0 in tl.static_range(0, BLOCK, 16):
        if USE_TABLE:
            tok = tl.load(TAB + c * BLOCK + r0 + r)
            valid = tok >= 0
        else:
            tok = c * BLOCK + r0 + r
            valid = (r0 + r) < size
        x = tl.load(base + tok.to(tl.int64)[:, None] * stride_xn + d[None, :], mask=valid[:, None], other=0.0)
        acc += x.to(tl.float32)
    mean = tl.sum(acc, axis=0) * inv_size
    tl.store(OUT + ((b * H + h).to(tl.int64) * C + c) * HEAD_DIM + d, mean)


@triton.jit
def pool_kernel(
    Q, K, V, QC, KC, VC, TAB, SIZES,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, C,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TABLE: tl.constexpr, WITH_V: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    size = tl.load(SIZES + c)
    inv_size = 1.0 / size.to(tl.float32)
    _pool_one(Q, QC, TAB, SIZES, size, inv_size, b, h, c, H, C, stride_qb, stride_qh, stride_qn,
              HEAD_DIM, BLOCK, USE_TABLE)
    _pool_one(K, KC, TAB, SIZES, size, inv_size, b, h, c, H, C, stride_kb, stride_kh, stride_kn,
              HEAD_DIM, BLOCK, USE_TABLE)
    if WITH_V:
        _pool_one(V, VC, TAB, SIZES, size, inv_size, b, h, c, H, C, stride_vb, stride_vh, stride_vn,
                  HEAD_DIM, BLOCK, USE_TABLE)
