"""Coarse scores: S = q_c k_c^T * scale for every (batch, head), float32.

A plain tiled GEMM over the pooled cubes on the tensor cores with input_precision "tf32x3":
each operand is split into a tf32 high part and a tf32 remainder and three products are summed,
which keeps float32 accuracy (the top-k that follows must agree with the float32 reference
wherever the choice is not a near-tie; plain tf32 would not) at several times the rate of the
FMA units' IEEE path. Cards before Ampere have no tf32 and take the IEEE path (ops chooses by
compute capability).
"""

import triton
import triton.language as tl


@triton.jit
def scores_kernel(QC, KC, S, C, scale, HEAD_DIM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                  BK: tl.constexpr, PRECISION: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    bh = tl.program_id(2).to(tl.int64)
    rows = pm * BM + tl.arange(0, BM)
    cols = pn * BN + tl.arange(0, BN)
    s = tl.zeros([BM, BN], tl.float32)
    for k0 in tl.static_range(0, HEAD_DIM, BK):
        d = k0 + tl.arange(0, BK)
        q = tl.load(QC + (bh * C + rows)[:, None] * HEAD_DIM + d[None, :], mask=(rows < C)[:, None], other=0.0)
        k = tl.load(KC + (bh * C + cols)[:, None] * HEAD_DIM + d[None, :], mask=(cols < C)[:, None], other=0.0)
        s += tl.dot(q, tl.trans(k), input_precision=PRECISION)
    s = s * scale
    tl.store(S + (bh * C + rows)[:, None] * C + cols[None, :], s, mask=(rows < C)[:, None] & (cols < C)[None, :])
