"""Block-sparse flash attention, forward.

One program per (query block, batch*head) walks that query block's list of key blocks with an
online softmax in base 2 (scale * log2(e) folded into the exponent's FMA), accumulating in float32.

Rows of a block are found in one of two ways (USE_TABLE):
- through the token table (num_blocks, BLOCK) of sequence indices, -1 for missing slots: this
  reads raster-ordered tensors directly (each cube is 16 runs of 4 contiguous tokens, every row a
  contiguous head_dim vector, so the loads stay 16-byte wide) and serves variable block sizes;
- as BLOCK consecutive rows starting at block * BLOCK, the first SIZES[block] of them real.
With KV_ROWS, K and V are instead the block-ordered copies the pooling pass writes
(batch*head, blocks * BLOCK, head_dim), every block padded to BLOCK rows with zeros: a key tile
is one contiguous slab, read with plain loads or (KV_DESC, Hopper and newer) as a TMA copy through
a host-side tensor descriptor over the copy's rows; KB is then 1.
Missing keys get -inf logits; missing query rows are never stored. Row offsets inside one
(batch, head) are 32-bit (the wrapper guarantees they fit): 64-bit offset tensors cost ~100 more
bytes of register spills per thread. KB key blocks per step (1 or 2) is a launch option; on the
H100 and H200 sweeps one block per step (4 warps, 2 stages) was fastest.

The softmax runs on the raw logits: the row max is taken before scaling (scale > 0), so
exp2(qk * scale - m * scale) is one FMA per element. (Moving the running max only when it grows
by more than a threshold, as FlashAttention-4 does, ran 6% slower on the H200: bench/attention.md.)

The row log-sum-exp (base 2, in units of the scaled logits) is stored per token for the backward.
"""

import triton
import triton.language as tl


@triton.jit
def bsa_fwd_kernel(
    Q, K, V, O, LSE, IDX, CNT, TAB, SIZES,
    stride_qb, stride_qh, stride_qn,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_on,
    H, NQB, N, kmax, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, USE_TABLE: tl.constexpr, DOT_F32: tl.constexpr,
    KB: tl.constexpr, KV_ROWS: tl.constexpr = False, KV_DESC: tl.constexpr = False,
):
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
    if DOT_F32:
        # Triton 3.6's interpreter multiplies bfloat16 bit patterns as integers: under it the
        # matrix operands are widened (the interpreter alone sets DOT_F32)
        q = q.to(tl.float32)
    if not KV_ROWS:
        k_base = K + b * stride_kb + h * stride_kh
        v_base = V + b * stride_vb + h * stride_vh

    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, HEAD_DIM], tl.float32)

    row = bh.to(tl.int64) * NQB + qb
    cnt = tl.load(CNT + row)
    idx_ptr = IDX + row * kmax
    # KB key blocks per step: with KB=2 the key tile is 2 * BLOCK wide, which halves the
    # online-softmax bookkeeping per FLOP and feeds the tensor cores a wider N
    n_offs = tl.arange(0, KB * BLOCK)
    half = n_offs // BLOCK
    slot = n_offs % BLOCK
    rows0 = bh * NQB * BLOCK  # KV_ROWS: this (batch, head)'s first row of the block-ordered copies
    for j in range(0, cnt, KB):
        if KV_ROWS:
            kb1 = tl.load(idx_ptr + j)
            k_valid = n_offs < tl.load(SIZES + kb1)
            if KV_DESC:
                k = K.load([rows0 + kb1 * BLOCK, 0])
                v = V.load([rows0 + kb1 * BLOCK, 0])
            else:
                krow = rows0.to(tl.int64) + kb1 * BLOCK + n_offs
                k = tl.load(K + krow[:, None] * HEAD_DIM + d[None, :])
                v = tl.load(V + krow[:, None] * HEAD_DIM + d[None, :])
        else:
            kb = tl.load(idx_ptr + j + half, mask=(j + half) < cnt, other=-1)
            if USE_TABLE:
                k_tok = tl.load(TAB + kb * BLOCK + slot, mask=kb >= 0, other=-1)
                k_valid = k_tok >= 0
            else:
                k_tok = kb * BLOCK + slot
                k_valid = slot < tl.load(SIZES + kb, mask=kb >= 0, other=0)
            k = tl.load(k_base + k_tok[:, None] * stride_kn + d[None, :], mask=k_valid[:, None], other=0.0)
            v = tl.load(v_base + k_tok[:, None] * stride_vn + d[None, :], mask=k_valid[:, None], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        qk = tl.dot(q, tl.trans(k))
        qk = tl.where(k_valid[None, :], qk, float("-inf"))
        m_cur = tl.max(qk, 1) * qk_scale
        m_new = tl.maximum(m_i, m_cur)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(qk * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + q_tok[:, None] * stride_on + d[None, :],
             acc.to(O.dtype.element_ty), mask=q_valid[:, None])
    tl.store(LSE + bh.to(tl.int64) * N + q_tok, m_i + tl.math.log2(l_i), mask=q_valid)
