"""Top-k block selection per score row, with the coarse softmax branch and its entropy.

One single-warp program per (query block, batch*head) holds its whole score row in registers,
so every reduction and prefix sum below stays inside the warp (shuffles, no shared memory or
barriers); a first version tiled 16 rows over 8 warps and spent its time in cross-warp reductions.

The k-th largest score is found by bisection on the float's order-preserving integer image
(32 steps, no sort). The kept block indices are then emitted already in ascending order through a
prefix sum, so the fine kernel gets compact lists and counts and no dense mask exists anywhere.
Equal scores at the threshold go to the lower block index, as in the reference.
"""

import triton
import triton.language as tl


@triton.jit
def select_kernel(
    S, VC, IDX, CNT, KK, ENT, COARSE,
    C, kmax,
    HEAD_DIM: tl.constexpr, CPAD: tl.constexpr, VCH: tl.constexpr,
    WITH_COARSE: tl.constexpr, WITH_STATS: tl.constexpr,
):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    row = bh.to(tl.int64) * C + qb
    cols = tl.arange(0, CPAD)
    cvalid = cols < C
    s = tl.load(S + row * C + cols, mask=cvalid, other=float("-inf"))

    kk = tl.load(KK + bh)
    bits = s.to(tl.int32, bitcast=True)
    # order-preserving int image of a float: flip the magnitude bits of negatives
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key = tl.where(cvalid, key, -2147483647 - 1)
    # largest t with count(key >= t) >= kk; int64 bounds keep lo + hi from overflowing
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483647, tl.int64)
    for _ in range(32):
        mid = (lo + hi + 1) >> 1
        n_ge = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), 0)
        ok = n_ge >= kk
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    thr = lo.to(tl.int32)
    gt = key > thr
    eq = key == thr
    n_gt = tl.sum(gt.to(tl.int32), 0)
    take = gt | (eq & (tl.cumsum(eq.to(tl.int32), 0) <= kk - n_gt))
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(IDX + row * kmax + pos, cols, mask=take)
    tl.store(CNT + row, tl.sum(take.to(tl.int32), 0))

    if WITH_STATS or WITH_COARSE:
        m = tl.max(s, 0)
        z = s - m
        p = tl.where(cvalid, tl.exp(z), 0.0)
        zsum = tl.sum(p, 0)
    if WITH_STATS:
        ent = tl.log(zsum) - tl.sum(tl.where(cvalid, p * z, 0.0), 0) / zsum
        tl.store(ENT + row, ent)
    if WITH_COARSE:
        # softmax(row) @ v_c by chunks: registers cannot be sliced, so chunks of the row are
        # re-read (an L1/L2 hit) instead
        d = tl.arange(0, HEAD_DIM)
        acc = tl.zeros([HEAD_DIM], tl.float32)
        for c0 in range(0, C, VCH):
            cc = c0 + tl.arange(0, VCH)
            cm = cc < C
            sc = tl.load(S + row * C + cc, mask=cm, other=float("-inf"))
            pc = tl.exp(sc - m)
            vc = tl.load(VC + (bh.to(tl.int64) * C + cc)[:, None] * HEAD_DIM + d[None, :], mask=cm[:, None],
                         other=0.0)
            acc += tl.sum(pc[:, None] * vc, 0)
        tl.store(COARSE + row * HEAD_DIM + d, acc / zsum)
