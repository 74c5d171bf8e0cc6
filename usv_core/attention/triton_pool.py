"""Cube pooling: the mean of q, k (and v) over the real tokens of every block.

One program per (block, batch*head) reads the block's rows through the token table, so raster
tensors are pooled without a reorder; q, k and v are pooled in the same launch. Rows are summed
16 at a time: a whole 64 x 128 tile per input held ~230 registers a thread, which starved this
memory-bound kernel of resident warps.

With KV_ROWS the same pass also writes the K and V rows it read in block order, each block padded
to BLOCK rows with zeros ((batch*head, blocks * BLOCK, head_dim), contiguous): the forward kernel
then reads every key tile as one contiguous BLOCK x head_dim slab (one TMA copy on Hopper) instead
of BLOCK row gathers through the table.
"""

import triton
import triton.language as tl


@triton.jit
def _pool_one(X, OUT, ROWS, TAB, size, inv_size, b, h, c, H, C,
              stride_xb, stride_xh, stride_xn,
              HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TABLE: tl.constexpr,
              POOL: tl.constexpr, STORE_ROWS: tl.constexpr):
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, 16)
    base = X + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh
    rows = ROWS + ((b * H + h).to(tl.int64) * C + c) * BLOCK * HEAD_DIM
    acc = tl.zeros([16, HEAD_DIM], tl.float32)
    for r0 in tl.static_range(0, BLOCK, 16):
        if USE_TABLE:
            tok = tl.load(TAB + c * BLOCK + r0 + r)
            valid = tok >= 0
        else:
            tok = c * BLOCK + r0 + r
            valid = (r0 + r) < size
        x = tl.load(base + tok.to(tl.int64)[:, None] * stride_xn + d[None, :], mask=valid[:, None], other=0.0)
        if STORE_ROWS:
            tl.store(rows + (r0 + r)[:, None] * HEAD_DIM + d[None, :], x)
        acc += x.to(tl.float32)
    if POOL:
        mean = tl.sum(acc, axis=0) * inv_size
        tl.store(OUT + ((b * H + h).to(tl.int64) * C + c) * HEAD_DIM + d, mean)


@triton.jit
def pool_kernel(
    Q, K, V, QC, KC, VC, KR, VR, TAB, SIZES,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    H, C,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TABLE: tl.constexpr, WITH_V: tl.constexpr,
    KV_ROWS: tl.constexpr,
):
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    size = tl.load(SIZES + c)
    inv_size = 1.0 / size.to(tl.float32)
    _pool_one(Q, QC, QC, TAB, size, inv_size, b, h, c, H, C, stride_qb, stride_qh, stride_qn,
              HEAD_DIM, BLOCK, USE_TABLE, True, False)
    _pool_one(K, KC, KR, TAB, size, inv_size, b, h, c, H, C, stride_kb, stride_kh, stride_kn,
              HEAD_DIM, BLOCK, USE_TABLE, True, KV_ROWS)
    if WITH_V or KV_ROWS:
        _pool_one(V, VC, VR, TAB, size, inv_size, b, h, c, H, C, stride_vb, stride_vh, stride_vn,
                  HEAD_DIM, BLOCK, USE_TABLE, WITH_V, KV_ROWS)
