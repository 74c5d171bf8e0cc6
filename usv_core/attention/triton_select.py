"""Coarse scores, top-k block selection, coarse softmax (gate branch) and its entropy, fused.

Each tile is QM query blocks of one (batch, head). Pass 1 walks the key blocks in chunks:
scores = q_c k_c^T * scale (float32, IEEE: the selection must match the reference bit for bit
wherever it is not a near-tie), the optional coarse output softmax(scores) @ v_c by online
softmax, and the raw scores into a per-program scratch row that stays in L2. Pass 2 reloads each
full score row and finds the k-th largest value by bisection on the float's ordered integer
image (32 steps, no sort), then emits the kept block indices already in ascending order with a
prefix sum, so the fine kernel gets compact lists and counts and no dense mask exists anywhere.
Equal scores at the threshold go to the lower block index, as in the reference.

The grid is persistent (a few programs per SM), which bounds the scratch to a few MB.
"""

import triton
import triton.language as tl


@triton.jit
def select_kernel(
    QC, KC, VC, IDX, CNT, KK, ENT, COARSE, SCRATCH,
    C, num_tiles, nprog, kmax, scale,
    HEAD_DIM: tl.constexpr, QM: tl.constexpr, KCH: tl.constexpr, CPAD: tl.constexpr,
    WITH_COARSE: tl.constexpr, WITH_STATS: tl.constexpr,
):
    pid = tl.program_id(0)
    n_qt = tl.cdiv(C, QM)
    d = tl.arange(0, HEAD_DIM)
    r = tl.arange(0, QM)
    scratch = SCRATCH + pid.to(tl.int64) * (QM * CPAD)
    for tile in range(pid, num_tiles, nprog):
        bh = tile // n_qt
        rows = (tile % n_qt) * QM + r
        rmask = rows < C
        head = bh.to(tl.int64) * C
        qc = tl.load(QC + (head + rows)[:, None] * HEAD_DIM + d[None, :], mask=rmask[:, None], other=0.0)

        # pass 1: scores by chunks of key blocks
        m_i = tl.full([QM], float("-inf"), tl.float32)
        l_i = tl.zeros([QM], tl.float32)
        acc = tl.zeros([QM, HEAD_DIM], tl.float32)
        for c0 in range(0, C, KCH):
            cols = c0 + tl.arange(0, KCH)
            cmask = cols < C
            kc = tl.load(KC + (head + cols)[:, None] * HEAD_DIM + d[None, :], mask=cmask[:, None], other=0.0)
            s = tl.dot(qc, tl.trans(kc), input_precision="ieee") * scale
            s = tl.where(cmask[None, :], s, float("-inf"))
            tl.store(scratch + r[:, None] * CPAD + cols[None, :], s)
            if WITH_COARSE:
                m_new = tl.maximum(m_i, tl.max(s, 1))
                alpha = tl.exp(m_i - m_new)
                p = tl.exp(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                vc = tl.load(VC + (head + cols)[:, None] * HEAD_DIM + d[None, :], mask=cmask[:, None], other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p, vc, input_precision="ieee")
                m_i = m_new
        if WITH_COARSE:
            tl.store(COARSE + (head + rows)[:, None] * HEAD_DIM + d[None, :], acc / l_i[:, None],
                     mask=rmask[:, None])
        # scratch was written by other threads of this program
        tl.debug_barrier()

        # pass 2: the whole row
        allc = tl.arange(0, CPAD)
        cvalid = allc[None, :] < C
        row = tl.load(scratch + r[:, None] * CPAD + allc[None, :], mask=cvalid, other=float("-inf"))
        # the next tile overwrites the scratch only after everyone has read it
        tl.debug_barrier()

        kk = tl.load(KK + bh)
        bits = row.to(tl.int32, bitcast=True)
        # order-preserving int image of a float: flip the magnitude bits of negatives
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
        key = tl.where(cvalid, key, -2147483647 - 1)
        # largest t with count(key >= t) >= kk; int64 bounds keep lo + hi from overflowing
        lo = tl.full([QM], -2147483648, tl.int64)
        hi = tl.full([QM], 2147483647, tl.int64)
        for _ in range(32):
            mid = (lo + hi + 1) >> 1
            n_ge = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), 1)
            ok = n_ge >= kk
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid - 1)
        thr = lo.to(tl.int32)[:, None]
        gt = key > thr
        eq = key == thr
        n_gt = tl.sum(gt.to(tl.int32), 1)
        eq_rank = tl.cumsum(eq.to(tl.int32), 1)
        take = gt | (eq & (eq_rank <= (kk - n_gt)[:, None]))
        pos = tl.cumsum(take.to(tl.int32), 1) - 1
        out_rows = (head + rows).to(tl.int64) * kmax
        colmat = allc[None, :] + tl.zeros([QM, CPAD], tl.int32)
        tl.store(IDX + out_rows[:, None] + pos, colmat, mask=take & rmask[:, None])
        tl.store(CNT + head + rows, tl.sum(take.to(tl.int32), 1), mask=rmask)

        if WITH_STATS:
            z = row - tl.max(row, 1)[:, None]
            pz = tl.where(cvalid, tl.exp(z), 0.0)
            zsum = tl.sum(pz, 1)
            ent = tl.log(zsum) - tl.sum(tl.where(cvalid, pz * z, 0.0), 1) / zsum
            tl.store(ENT + head + rows, ent, mask=rmask)
