"""The PyTorch reference of Video Sparse Attention against independent brute-force definitions,
dense SDPA at keep 1, and the input checks of the public API."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from usv_core.attention import block_sparse_attention, supports, vsa_attention, vsa_attention_blocked
from usv_core.attention.reference import select_blocks
from usv_core.tiling import cube_tiling, from_cube_order, to_cube_order


def rel_l2(a, b):
    err = ((a.double() - b.double()).norm() / b.double().norm()).item()
    return err if math.isfinite(err) else float("inf")  # NaN never passes


def rand(*shape, dtype=torch.float32, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % (2**31))
    return torch.randn(*shape, generator=g).to(dtype)


def packed_blocks(cubes_by_key, vol):
    """Blocks by the packing rule: walking each cube row (same t and h cube) along w, a partial
    cube joins the block before it when that block is partial too and the sum fits in vol."""
    blocks, last = [], None
    for key in sorted(cubes_by_key):
        m = cubes_by_key[key]
        row = key[:2]
        if last is not None and last[0] == row and len(m) < vol and len(blocks[-1]) < vol and \
                len(blocks[-1]) + len(m) <= vol and last[1] < vol:
            blocks[-1] = blocks[-1] + m
        else:
            blocks.append(list(m))
        last = (row, len(m))
    return blocks


def brute_force_vsa(q, k, v, grid, cube, keep_counts, gate=None, scale=None, pack=False):
    """Token-by-token VSA straight from the definition, float64, loops over block members
    (cubes, or with pack the blocks of the packing rule)."""
    B, H, N, D = q.shape
    T, Hh, W = grid
    scale = D ** -0.5 if scale is None else scale
    members = {}
    for t, h, w in itertools.product(range(T), range(Hh), range(W)):
        key = (t // cube[0], h // cube[1], w // cube[2])
        members.setdefault(key, []).append((t * Hh + h) * W + w)
    cubes = packed_blocks(members, math.prod(cube)) if pack else [members[key] for key in sorted(members)]
    cube_of = {r: c for c, m in enumerate(cubes) for r in m}
    q, k, v = q.double(), k.double(), v.double()
    out = torch.zeros(B, H, N, D, dtype=torch.float64)
    for b, h in itertools.product(range(B), range(H)):
        qc = torch.stack([q[b, h, m].mean(0) for m in cubes])
        kc = torch.stack([k[b, h, m].mean(0) for m in cubes])
        vc = torch.stack([v[b, h, m].mean(0) for m in cubes])
        scores = qc @ kc.T * scale
        n_keep = keep_counts[b][h]
        for i in range(N):
            ci = cube_of[i]
            row = scores[ci].tolist()
            # highest score first, lower index first among equals
            kept = sorted(range(len(cubes)), key=lambda j: (-row[j], j))[:n_keep]
            keys = [r for j in kept for r in cubes[j]]
            p = torch.softmax(q[b, h, i] @ k[b, h, keys].T * scale, 0)
            out[b, h, i] = p @ v[b, h, keys]
            if gate is not None:
                coarse = torch.softmax(scores[ci], 0) @ vc
                out[b, h, i] += gate.double().expand(B, H, N, D)[b, h, i] * coarse
    return out


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("grid,cube", [((5, 7, 9), (4, 4, 4)), ((3, 4, 5), (2, 2, 2))])
def test_keep_one_is_dense_attention(dtype, tol, grid, cube):
    N = math.prod(grid)
    q, k, v = (rand(2, 3, N, 32, dtype=dtype) for _ in range(3))
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    out = vsa_attention(q, k, v, grid, 1.0, cube=cube)
    assert out.dtype == dtype and out.shape == q.shape
    assert rel_l2(out, dense) <= tol


def test_matches_brute_force_definition_with_edges_gate_and_per_head_keep():
    grid, cube = (3, 5, 3), (2, 2, 2)  # 2 x 3 x 2 cubes, most of them edge cubes
    N = math.prod(grid)
    q, k, v = (rand(2, 2, N, 8) for _ in range(3))
    gate = rand(2, 2, N, 8)
    keep = torch.tensor([[0.25, 0.5], [0.1, 1.0]])
    C = 12
    counts = [[max(1, math.ceil(float(x) * C - 1e-6)) for x in row] for row in keep]
    assert counts == [[3, 6], [2, 12]]
    ref = brute_force_vsa(q, k, v, grid, cube, counts, gate=gate)
    out = vsa_attention(q, k, v, grid, keep, cube=cube, gate=gate, pack_edges=False)
    assert rel_l2(out, ref) <= 1e-5
    # the gate only adds the coarse term
    no_gate = vsa_attention(q, k, v, grid, keep, cube=cube, pack_edges=False)
    assert rel_l2(no_gate, brute_force_vsa(q, k, v, grid, cube, counts)) <= 1e-5
    assert rel_l2(out - no_gate, ref - brute_force_vsa(q, k, v, grid, cube, counts)) <= 1e-4


@pytest.mark.parametrize("grid", [(3, 5, 3), (3, 3, 8)])
def test_packed_edges_match_brute_force_on_joined_blocks(grid):
    cube = (2, 2, 2)
    N = math.prod(grid)
    q, k, v = (rand(1, 2, N, 8) for _ in range(3))
    gate = rand(1, 2, N, 8)
    members = {}
    for t, h, w in itertools.product(*(range(g) for g in grid)):
        members.setdefault((t // 2, h // 2, w // 2), []).append((t * grid[1] + h) * grid[2] + w)
    C = len(packed_blocks(members, 8))
    assert C < len(members)  # these grids have edge cubes to join
    keep = torch.tensor([0.3, 0.6])
    counts = [[max(1, math.ceil(float(x) * C - 1e-6)) for x in keep]]
    ref = brute_force_vsa(q, k, v, grid, cube, counts, gate=gate, pack=True)
    assert rel_l2(vsa_attention(q, k, v, grid, keep, cube=cube, gate=gate), ref) <= 1e-5


def test_selection_ties_go_to_lower_index_and_lists_are_sorted():
    scores = torch.tensor([[[[1.0, 3.0, 3.0, 0.0, 3.0, 2.0]]]])
    idx, cnt = select_blocks(scores, torch.tensor([[2]]))
    assert cnt.tolist() == [[[2]]] and idx.tolist() == [[[[1, 2]]]]
    idx, cnt = select_blocks(scores, torch.tensor([[4]]))
    assert idx.tolist() == [[[[1, 2, 4, 5]]]]
    s = rand(1, 2, 7, 9)
    idx, cnt = select_blocks(s, torch.tensor([[3, 5]]))
    for h, n in ((0, 3), (1, 5)):
        for r in range(7):
            chosen = idx[0, h, r, :n].tolist()
            assert chosen == sorted(chosen) and cnt[0, h, r] == n
            rest = [j for j in range(9) if j not in chosen]
            assert s[0, h, r, chosen].min() >= s[0, h, r, rest].max()
        assert (idx[0, h, :, n:] == -1).all()


def test_entropy_stats():
    grid = (4, 4, 8)
    N = math.prod(grid)
    k, v = rand(1, 2, N, 16), rand(1, 2, N, 16)
    # zero queries: every coarse row is uniform, entropy exactly 1
    _, h = vsa_attention(torch.zeros(1, 2, N, 16), k, v, grid, 0.5, cube=(2, 2, 2), return_stats=True)
    assert torch.allclose(h, torch.ones(1, 2), atol=1e-6)
    # large queries: peaked rows, entropy well below 1; compare with a direct computation
    q, k = rand(1, 2, N, 16) * 30, k * 30
    _, h = vsa_attention(q, k, v, grid, 0.5, cube=(2, 2, 2), return_stats=True)
    tl = cube_tiling(grid, (2, 2, 2))
    qc = torch.stack([q[:, :, tl.perm[s:e]].mean(2) for s, e in zip(tl.block_starts[:-1], tl.block_starts[1:])], 2)
    kc = torch.stack([k[:, :, tl.perm[s:e]].mean(2) for s, e in zip(tl.block_starts[:-1], tl.block_starts[1:])], 2)
    logp = torch.log_softmax((qc @ kc.transpose(-1, -2)).double() / 4.0, -1)
    expect = (-(logp.exp() * logp).sum(-1) / math.log(tl.num_cubes)).mean(-1)
    assert h.shape == (1, 2) and (h >= 0).all() and (h <= 1).all()
    assert torch.allclose(h.double(), expect, atol=1e-5)
    assert (h < 0.5).all()


def test_blocked_entry_equals_grid_entry_on_cube_order():
    grid = (5, 7, 9)
    N = math.prod(grid)
    q, k, v = (rand(1, 2, N, 16) for _ in range(3))
    tl = cube_tiling(grid)
    a = vsa_attention(q, k, v, grid, 0.4, pack_edges=False)
    qc, kc, vc = (to_cube_order(t, grid) for t in (q, k, v))
    b = from_cube_order(vsa_attention_blocked(qc, kc, vc, tl.block_sizes, 0.4), grid)
    assert rel_l2(b, a) <= 1e-5
    # packed blocks are runs of consecutive cubes: the same sequence, grouped by their sizes
    a = vsa_attention(q, k, v, grid, 0.4)
    b = from_cube_order(vsa_attention_blocked(qc, kc, vc, tl.packed.block_sizes, 0.4), grid)
    assert rel_l2(b, a) <= 1e-5


def test_blocked_variable_sizes_dense_at_keep_one():
    sizes = torch.tensor([5, 64, 1, 17, 33, 2])
    N = int(sizes.sum())
    q, k, v = (rand(1, 2, N, 16, dtype=torch.bfloat16) for _ in range(3))
    out = vsa_attention_blocked(q, k, v, sizes, 1.0)
    dense = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    assert rel_l2(out, dense) <= 1e-2


def test_block_sparse_attention_reference_matches_masked_dense():
    N, bs = 70, 16  # 5 blocks, the last one 6 tokens long
    q, k, v = (rand(1, 1, N, 8) for _ in range(3))
    idx = torch.tensor([[[[0, 2, 0], [1, 0, 0], [0, 3, 4], [3, 0, 0], [4, 0, 0]]]])
    cnt = torch.tensor([[[2, 1, 3, 1, 1]]])
    out = block_sparse_attention(q, k, v, idx, cnt, block_size=bs)
    allowed = torch.zeros(5, 5, dtype=torch.bool)
    for i, row in enumerate(idx[0, 0].tolist()):
        allowed[i, row[: cnt[0, 0, i]]] = True
    blk = torch.arange(N) // bs
    mask = allowed[blk[:, None], blk[None, :]]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert rel_l2(out, ref) <= 1e-5


# ------------------------------------------------------------------ bad input
def test_bad_inputs_raise_value_errors_naming_the_argument():
    grid = (2, 4, 4)
    N = 32
    q = rand(1, 2, N, 16)
    with pytest.raises(ValueError, match="k"):
        vsa_attention(q, rand(1, 2, N + 1, 16), q, grid, 0.5)
    with pytest.raises(ValueError, match="v"):
        vsa_attention(q, q, rand(1, 3, N, 16), grid, 0.5)
    with pytest.raises(ValueError, match="grid"):
        vsa_attention(q, q, q, (2, 4, 5), 0.5)
    with pytest.raises(ValueError, match="grid"):
        vsa_attention(q, q, q, (2, 16), 0.5)
    for keep in (0.0, -0.1, 1.5, float("nan"), True, "half", torch.tensor([0.5, 0.0]),
                 torch.tensor([0.5, 0.5, 0.5]), torch.tensor([[0.5, 2.0]])):
        with pytest.raises(ValueError, match="keep"):
            vsa_attention(q, q, q, grid, keep)
    with pytest.raises(ValueError, match="block_sizes"):
        vsa_attention_blocked(q, q, q, torch.tensor([16, 15]), 0.5)
    with pytest.raises(ValueError, match="block_sizes"):
        vsa_attention_blocked(q, q, q, torch.tensor([16, 16, 0]), 0.5)
    with pytest.raises(ValueError, match="backend"):
        vsa_attention(q, q, q, grid, 0.5, backend="cuda")
    with pytest.raises(ValueError, match="q"):
        vsa_attention(q[0], q[0], q[0], grid, 0.5)


def test_cpu_tensors_use_the_reference_quietly(recwarn):
    grid = (2, 4, 4)
    q = rand(1, 1, 32, 24, dtype=torch.float64)  # a head dim and dtype no kernel has
    out = vsa_attention(q, q, q, grid, 0.5)
    assert out.dtype == torch.float64 and torch.isfinite(out).all()
    assert not [w for w in recwarn.list if "usv" in str(w.message)]
    ok, reason = supports(q)
    assert not ok and "cuda" in reason.lower()
