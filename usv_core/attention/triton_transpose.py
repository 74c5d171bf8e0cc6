"""List transposition for the backward: per query block the key blocks it attends -> per key
block the query blocks that attend it, ascending, on the GPU.

Two launches, no sort and no host sync:
- scatter_kernel: every (query block, batch*head) program marks its listed key blocks in a
  (batch*head, key block, query block) byte mask, zeroed before;
- compact_kernel: every (key block, batch*head) program reads its mask row and writes the set
  positions in ascending order through a prefix sum (as select_kernel emits its lists), and the
  count. The list width is the number of blocks, so no maximum needs to reach the host.
"""

import triton
import triton.language as tl


@triton.jit
def scatter_kernel(IDX, CNT, MASK, C, kmax, KPAD: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = bh * C + qb
    j = tl.arange(0, KPAD)
    cnt = tl.load(CNT + row)
    kb = tl.load(IDX + row * kmax + j, mask=j < cnt, other=0)
    tl.store(MASK + (bh * C + kb) * C + qb, tl.full([KPAD], 1, tl.int8), mask=j < cnt)


@triton.jit
def compact_kernel(MASK, QIDX, QCNT, C, CPAD: tl.constexpr):
    kb = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)
    row = bh * C + kb
    cols = tl.arange(0, CPAD)
    take = tl.load(MASK + row * C + cols, mask=cols < C, other=0) != 0
    pos = tl.cumsum(take.to(tl.int32), 0) - 1
    tl.store(QIDX + row * C + pos, cols, mask=take)
    tl.store(QCNT + row, tl.sum(take.to(tl.int32), 0))
