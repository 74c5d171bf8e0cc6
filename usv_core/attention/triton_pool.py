"""Cube pooling: the mean of q, k (and v) over the real tokens of every block.

One program per (block, batch*head) reads the block's token table once and then the whole
BLOCK x HEAD_DIM tile of each input, all loads issued before the first sum: the kernel is
memory-bound and small, so what matters is how many bytes are in flight per program. (Summing
16 rows at a time, as a first version did, kept one 4 KB load in flight and ran at ~200 GB/s.)
"""

import triton
import triton.language as tl


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
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    r = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)
    size = tl.load(SIZES + c)
    if USE_TABLE:
        tok = tl.load(TAB + c * BLOCK + r)
        valid = tok >= 0
    else:
        tok = c * BLOCK + r
        valid = r < size
    rows = tok.to(tl.int64)[:, None]
    x_q = tl.load(Q + b * stride_qb + h * stride_qh + rows * stride_qn + d[None, :], mask=valid[:, None], other=0.0)
    x_k = tl.load(K + b * stride_kb + h * stride_kh + rows * stride_kn + d[None, :], mask=valid[:, None], other=0.0)
    inv = 1.0 / size.to(tl.float32)
    out = (bh.to(tl.int64) * C + c) * HEAD_DIM + d
    tl.store(QC + out, tl.sum(x_q.to(tl.float32), axis=0) * inv)
    tl.store(KC + out, tl.sum(x_k.to(tl.float32), axis=0) * inv)
    if WITH_V:
        x_v = tl.load(V + b * stride_vb + h * stride_vh + rows * stride_vn + d[None, :], mask=valid[:, None],
                      other=0.0)
        tl.store(VC + out, tl.sum(x_v.to(tl.float32), axis=0) * inv)
