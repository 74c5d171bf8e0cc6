"""Coarse scores: S = q_c k_c^T * scale for every (batch, head), float32.

A plain tiled GEMM over the pooled cubes. IEEE float32 on purpose: the top-k that follows must
agree with the float32 reference wherever the choice is not a near-tie, and TF32 would not.
"""

import triton
import triton.language as tl


@triton.jit
def scores_kernel(QC, KC, S, C, scale, HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    rows = pm * BM + tl.arange(0, BM)
    cols = pn * BN + tl.arange(0, BN)
    s = tl.zeros([BM, BN], tl.float32)
    # IEEE float32 dots run on FMA units: short K steps keep the operands out of local memory
    for k0 in tl.static_range(0, HEAD_DIM, BK):
        d = k0 + tl.arange(0, BK)
        q = tl.load(QC + (bh * C + rows)[:, None] * HEAD_DIM + d[None, :], mask=(rows < C)[:, None], other=0.0)
        k = tl.load(KC + (bh * C + cols)[:, None] * HEAD_DIM + d[None, :], mask=(cols < C)[:, None], other=0.0)
        s += tl.dot(q, tl.trans(k), input_precision="ieee")
    s = s * scale
    tl.store(S + (bh * C + rows)[:, None] * C + cols[None, :], s, mask=(rows < C)[:, None] & (cols < C)[None, :])
