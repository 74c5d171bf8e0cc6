"""Block-sparse flash attention, backward: dq by query block, then dk and dv by key block.

The probabilities are recomputed from the forward's base-2 log-sum-exp. The dq kernel walks the
same per-query-block key lists as the forward and, on the way, stores delta = rowsum(dO * O) that
the dk/dv kernel needs, so no separate preprocessing launch exists. The dk/dv kernel walks the
transposed lists (per key block, the query blocks that selected it), which keeps every program's
writes private: no atomics, deterministic results. Those lists differ in length (random data and
real videos both favour some key blocks), so its programs take key blocks in ORDER, longest list
first: the long ones start early instead of forming a tail.
"""

import triton
import triton.language as tl


@triton.jit
def bsa_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, LSE, DELTA, IDX, CNT, TAB, SIZES,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, NQB, N, kmax, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TABLE: tl.constexpr, DOT_F32: tl.constexpr,
):
    # O, DO and DQ share stride_o*
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)

    if USE_TABLE:
        q_tok = tl.load(TAB + qb * BLOCK + offs)
        q_valid = q_tok >= 0
    else:
        q_tok = qb * BLOCK + offs
        q_valid = offs < tl.load(SIZES + qb)
    q = tl.load(Q + b * stride_qb + h * stride_qh + q_tok[:, None] * stride_qn + d[None, :],
                mask=q_valid[:, None], other=0.0)
    o_off = b * stride_ob + h * stride_oh + q_tok[:, None] * stride_on + d[None, :]
    do = tl.load(DO + o_off, mask=q_valid[:, None], other=0.0)
    o = tl.load(O + o_off, mask=q_valid[:, None], other=0.0)
    if DOT_F32:  # see triton_fwd: interpreter only
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tok_off = bh.to(tl.int64) * N + q_tok
    tl.store(DELTA + tok_off, delta, mask=q_valid)
    lse = tl.load(LSE + tok_off, mask=q_valid, other=0.0)

    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    row = bh.to(tl.int64) * NQB + qb
    cnt = tl.load(CNT + row)
    idx_ptr = IDX + row * kmax
    for j in range(0, cnt):
        kb = tl.load(idx_ptr + j)
        if USE_TABLE:
            k_tok = tl.load(TAB + kb * BLOCK + offs)
            k_valid = k_tok >= 0
        else:
            k_tok = kb * BLOCK + offs
            k_valid = offs < tl.load(SIZES + kb)
        k = tl.load(k_base + k_tok[:, None] * stride_kn + d[None, :], mask=k_valid[:, None], other=0.0)
        v = tl.load(v_base + k_tok[:, None] * stride_vn + d[None, :], mask=k_valid[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        p = tl.math.exp2(qk * qk_scale - lse[:, None])
        p = tl.where(k_valid[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    dq = dq * sm_scale
    tl.store(DQ + o_off, dq.to(DQ.dtype.element_ty), mask=q_valid[:, None])


@triton.jit
def bsa_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, QIDX, QCNT, ORDER, TAB, SIZES,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    stride_gb, stride_gh, stride_gn,
    H, NKB, N, qmax, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TABLE: tl.constexpr, DOT_F32: tl.constexpr,
):
    # DO uses stride_o*; DK and DV share stride_g*
    bh = tl.program_id(1)
    kb = tl.load(ORDER + bh.to(tl.int64) * NKB + tl.program_id(0))
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    d = tl.arange(0, HEAD_DIM)

    if USE_TABLE:
        k_tok = tl.load(TAB + kb * BLOCK + offs)
        k_valid = k_tok >= 0
    else:
        k_tok = kb * BLOCK + offs
        k_valid = offs < tl.load(SIZES + kb)
    k = tl.load(K + b * stride_kb + h * stride_kh + k_tok[:, None] * stride_kn + d[None, :],
                mask=k_valid[:, None], other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + k_tok[:, None] * stride_vn + d[None, :],
                mask=k_valid[:, None], other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_ob + h * stride_oh
    dk = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK, HEAD_DIM], tl.float32)
    row = bh.to(tl.int64) * NKB + kb
    cnt = tl.load(QCNT + row)
    idx_ptr = QIDX + row * qmax
    for j in range(0, cnt):
        qb = tl.load(idx_ptr + j)
        if USE_TABLE:
            q_tok = tl.load(TAB + qb * BLOCK + offs)
            q_valid = q_tok >= 0
        else:
            q_tok = qb * BLOCK + offs
            q_valid = offs < tl.load(SIZES + qb)
        q = tl.load(q_base + q_tok[:, None] * stride_qn + d[None, :], mask=q_valid[:, None], other=0.0)
        do = tl.load(do_base + q_tok[:, None] * stride_on + d[None, :], mask=q_valid[:, None], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        tok_off = bh.to(tl.int64) * N + q_tok
        # +inf log-sum-exp makes the missing query rows' probabilities exactly 0
        lse = tl.load(LSE + tok_off, mask=q_valid, other=float("inf"))
        delta = tl.load(DELTA + tok_off, mask=q_valid, other=0.0)
        qkt = tl.dot(k, tl.trans(q))
        pt = tl.math.exp2(qkt * qk_scale - lse[None, :])
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
    dk = dk * sm_scale
    g_off = b * stride_gb + h * stride_gh + k_tok[:, None] * stride_gn + d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=k_valid[:, None])
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=k_valid[:, None])
