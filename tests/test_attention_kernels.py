"""Triton kernels against the PyTorch reference.

Without a GPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) at
tiny sizes; the `gpu` tests repeat the checks at the Wan 1.3B 480p size on a CUDA device.
Every check draws fresh random inputs and starts kernel outputs as NaN (ops.POISON_OUTPUTS).
"""

import math
import warnings

import pytest
import torch

from usv_core.attention import block_sparse_attention, ops, supports, vsa_attention, vsa_attention_blocked
from usv_core.attention.reference import coarse_scores, select_blocks
from usv_core.tiling import blocked_layout, cube_tiling

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def poison_outputs():
    ops.POISON_OUTPUTS = True
    yield
    ops.POISON_OUTPUTS = False


def rel_l2(a, b):
    err = ((a.double() - b.double()).norm() / b.double().norm()).item()
    return err if math.isfinite(err) else float("inf")  # NaN never passes


def rand(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def both(fn, *args, **kw):
    return fn(*args, backend="triton", **kw), fn(*args, backend="reference", **kw)


# --------------------------------------------------------------------------- interpreter sizes
def test_forward_odd_grid_bf16_d64_with_stats():
    grid = (5, 7, 9)  # 2 x 2 x 3 cubes, edge cubes along every axis
    q, k, v = (rand(1, 2, math.prod(grid), 64) for _ in range(3))
    (out, h), (ref, h_ref) = both(vsa_attention, q, k, v, grid, 0.3, return_stats=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_l2(out, ref) <= 1e-2
    assert torch.allclose(h, h_ref, atol=1e-4) and ((h > 0) & (h < 1)).all()


def test_forward_scaled_wan_grid_fp16_d128_batch_gate_per_batch_head_keep():
    grid = (5, 6, 10)  # (21, 30, 52) scaled down: edges along every axis, 12 cubes
    N = math.prod(grid)
    q, k, v = (rand(2, 2, N, 128, dtype=torch.float16) for _ in range(3))
    gate = rand(2, 2, N, 128, dtype=torch.float16)
    keep = torch.tensor([[0.2, 0.5], [0.05, 1.0]], device=DEV)
    (out, h), (ref, h_ref) = both(vsa_attention, q, k, v, grid, keep, gate=gate, return_stats=True)
    assert rel_l2(out, ref) <= 1e-2
    assert torch.allclose(h, h_ref, atol=1e-4)
    assert h[1, 1] > 0.5  # d=128 random inputs: flat coarse attention


def test_per_head_keep_and_selection_lists_match_reference():
    grid = (5, 7, 9)
    tl = cube_tiling(grid, device=DEV)
    lay = tl.layout
    q, k, v = (rand(1, 3, math.prod(grid), 64) for _ in range(3))
    counts = torch.tensor([[1, 4, 12]], dtype=torch.int32, device=DEV)
    ridx, rcnt = select_blocks(coarse_scores(q, k, lay, 0.125), counts)
    # both score paths: tf32x3 on tensor cores (Ampere and newer) and IEEE float32 (older cards)
    for precision in ("tf32x3", "ieee"):
        ops._SCORE_PRECISION = precision
        try:
            idx, cnt, *_ = ops.select(q, k, v, lay.token_table, lay.block_sizes, counts.view(-1), 12, lay.block,
                                      True, 0.125, False, False)
        finally:
            ops._SCORE_PRECISION = None
        assert torch.equal(cnt, rcnt)
        for h, n in enumerate((1, 4, 12)):
            assert torch.equal(idx[0, h, :, :n], ridx[0, h, :, :n]), precision
    keep = torch.tensor([1 / 12, 4 / 12, 1.0], device=DEV)
    saved = dict(ops._FWD_CONFIG)
    try:
        # logits of spread 1 and of spread ~20 (base 2): the running max must move
        for spread in (1.0, 6.0):
            qs = (q.float() * spread).to(q.dtype)
            ref = vsa_attention(qs, k, v, grid, keep, backend="reference")
            for kb in (1, 2):  # one or two key blocks per step of the forward kernel; odd counts too
                ops.set_kernel_config(fwd={"KB": kb})
                out = vsa_attention(qs, k, v, grid, keep, backend="triton")
                assert rel_l2(out, ref) <= 1e-2, (spread, kb)
    finally:
        ops._FWD_CONFIG.clear()
        ops._FWD_CONFIG.update(saved)


@pytest.fixture
def kv_source(request):
    saved = ops._FWD_KV
    ops.set_kernel_config(kv=request.param)
    yield request.param
    ops._FWD_KV = saved


@pytest.mark.parametrize("kv_source", ["table", "rows", "tma"], indirect=True)
@pytest.mark.parametrize("pack_edges", [True, False])
def test_every_key_tile_source_matches_the_reference(kv_source, pack_edges):
    """The forward reads key tiles through the token table, or from the pooling pass's
    block-ordered copies (plain loads, or tensor descriptors): odd grids with edge cubes along
    every axis, per-head keep, a gate, merged block sizes."""
    grid = (5, 7, 9)
    N = math.prod(grid)
    q, k, v = (rand(1, 2, N, 64) for _ in range(3))
    gate = rand(1, 2, N, 64)
    keep = torch.tensor([0.1, 0.6], device=DEV)
    out, ref = both(vsa_attention, q, k, v, grid, keep, gate=gate, pack_edges=pack_edges)
    assert rel_l2(out, ref) <= 1e-2
    sizes = torch.tensor([64, 3, 40, 1, 64, 17, 9], device=DEV)
    q, k, v = (rand(1, 2, int(sizes.sum()), 128, dtype=torch.float16) for _ in range(3))
    out, ref = both(vsa_attention_blocked, q, k, v, sizes, 0.4)
    assert rel_l2(out, ref) <= 1e-2


def test_without_memory_for_the_key_copies_the_forward_reads_through_the_table(monkeypatch):
    """A card short of memory for the block-ordered copies still gets the exact output, and one warning."""
    from usv_core.attention import api

    grid = (5, 7, 9)
    q, k, v = (rand(1, 2, math.prod(grid), 64) for _ in range(3))
    with torch.no_grad():
        want = vsa_attention(q, k, v, grid, 0.3, backend="triton")  # with the copies where they fit
    select, calls = ops.select, []

    def short_of_memory(*args):
        calls.append(args[-1])
        if args[-1]:  # with_rows
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return select(*args)

    monkeypatch.setattr(ops, "_FWD_KV", "rows")
    monkeypatch.setattr(ops, "select", short_of_memory)
    monkeypatch.setattr(api, "_warned", set())
    with pytest.warns(UserWarning, match="token table"), torch.no_grad():
        out = vsa_attention(q, k, v, grid, 0.3, backend="triton")
    assert calls == [True, False] and torch.equal(out, want)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        vsa_attention(q, k, v, grid, 0.3, backend="triton")


def test_the_pooling_pass_writes_key_and_value_rows_in_block_order():
    grid = (5, 7, 9)
    lay = cube_tiling(grid, device=DEV).packed
    q, k, v = (rand(2, 3, math.prod(grid), 64) for _ in range(3))
    counts = torch.full((6,), 2, dtype=torch.int32, device=DEV)
    *_, kr, vr = ops.select(q, k, v, lay.token_table, lay.block_sizes, counts, 2, lay.block, True, 0.125,
                            False, False, True)
    tab = lay.token_table.reshape(-1).long()
    for src, rows in ((k, kr), (v, vr)):
        want = src.reshape(6, -1, 64)[:, tab.clamp_min(0)] * (tab >= 0)[None, :, None]
        assert torch.equal(rows, want.to(src.dtype))  # padding slots are zeros, not NaN


@pytest.mark.parametrize("C,kmax", [(7, 3), (40, 17)])
def test_list_transposition_matches_the_mask(C, kmax):
    from usv_core.attention.reference import block_mask_from_lists

    g = torch.Generator().manual_seed(C)
    cnt = torch.randint(1, kmax + 1, (2, 3, C), generator=g, dtype=torch.int32)
    scores = torch.rand(2, 3, C, C, generator=g)
    idx = torch.full((2, 3, C, kmax), -1, dtype=torch.int32)
    for b, h, r in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(C)).tolist():
        n = int(cnt[b, h, r])
        idx[b, h, r, :n] = scores[b, h, r].topk(n).indices.sort().values.to(torch.int32)
    idx, cnt = idx.to(DEV), cnt.to(DEV)
    qidx, qcnt, order = ops.transpose_lists(idx, cnt, C)
    mask_t = block_mask_from_lists(idx, cnt, C).transpose(-1, -2)
    assert torch.equal(qcnt.long(), mask_t.sum(-1))
    for b, h, kb in torch.cartesian_prod(torch.arange(2), torch.arange(3), torch.arange(C)).tolist():
        n = int(qcnt[b, h, kb])
        assert qidx[b, h, kb, :n].tolist() == torch.nonzero(mask_t[b, h, kb]).flatten().tolist()
    # every key block once per (batch, head), longest query list first
    assert torch.equal(order.sort(-1).values.long(), torch.arange(C, device=DEV).expand(2, 3, C))
    lengths = qcnt.gather(-1, order.long())
    assert (lengths[..., :-1] >= lengths[..., 1:]).all()


@pytest.fixture(params=[{}, {"num_warps": 8, "num_stages": 2}], ids=["dkdv-as-dq", "dkdv-8-warps"])
def dkdv_config(request):
    ops.set_kernel_config(bwd_dkdv=request.param)
    yield request.param
    ops.set_kernel_config(bwd_dkdv={})


def test_gradients_match_autograd_through_reference(dkdv_config):
    grid = (5, 6, 10)
    N = math.prod(grid)
    # bf16-representable inputs: both sides must see the same values to pick the same blocks
    base = [rand(1, 2, N, 64).float() for _ in range(4)]
    grads = {}
    for backend, dtype in (("triton", torch.bfloat16), ("reference", torch.float32)):
        q, k, v, gate = (t.to(dtype).requires_grad_() for t in base)
        out = vsa_attention(q, k, v, grid, 0.4, gate=gate, backend=backend)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEV, dtype)
        out.backward(dout)
        grads[backend] = [out.detach()] + [t.grad for t in (q, k, v, gate)]
    for name, a, b in zip(("out", "dq", "dk", "dv", "dgate"), grads["triton"], grads["reference"]):
        assert torch.isfinite(a).all(), name
        assert rel_l2(a, b) <= 2e-2, name


def test_variable_block_sizes():
    sizes = torch.tensor([64, 3, 40, 1, 64, 17, 9], device=DEV)
    N = int(sizes.sum())
    q, k, v = (rand(1, 2, N, 64) for _ in range(3))
    gate = rand(1, 1, 1, 64)
    (out, h), (ref, h_ref) = both(vsa_attention_blocked, q, k, v, sizes, 0.4, gate=gate, return_stats=True)
    assert rel_l2(out, ref) <= 1e-2
    assert torch.allclose(h, h_ref, atol=1e-4)
    # gradients through the variable-size path
    qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
    vsa_attention_blocked(qq, kk, vv, sizes, 0.4, backend="triton").float().pow(2).sum().backward()
    q2, k2, v2 = (t.float().requires_grad_() for t in (q, k, v))
    vsa_attention_blocked(q2, k2, v2, sizes, 0.4, backend="reference").pow(2).sum().backward()
    for a, b in ((qq, q2), (kk, k2), (vv, v2)):
        assert rel_l2(a.grad, b.grad) <= 3e-2


def test_wide_rows_fall_back_to_torch_selection(monkeypatch):
    # more cubes than one program's registers hold: selection in torch, same lists and results
    monkeypatch.setattr(ops, "MAX_SELECT_BLOCKS", 8)
    grid = (5, 7, 9)
    q, k, v = (rand(1, 2, math.prod(grid), 64) for _ in range(3))
    gate = rand(1, 2, math.prod(grid), 64)
    (out, h), (ref, h_ref) = both(vsa_attention, q, k, v, grid, 0.3, gate=gate, return_stats=True)
    assert rel_l2(out, ref) <= 1e-2
    assert torch.allclose(h, h_ref, atol=1e-4)


def test_block_sparse_attention_uniform_blocks_and_tables():
    N, bs = 80, 32  # 3 blocks of 32, 32, 16 tokens
    q, k, v = (rand(2, 1, N, 64, dtype=torch.float16) for _ in range(3))
    idx = torch.tensor([[[0, 2], [1, 0], [2, 1]]], dtype=torch.int32, device=DEV)[None].expand(2, 1, 3, 2)
    cnt = torch.tensor([[[2, 1, 2]]], dtype=torch.int32, device=DEV).expand(2, 1, 3)
    out, ref = both(block_sparse_attention, q, k, v, idx, cnt, block_size=bs)
    assert rel_l2(out, ref) <= 1e-2
    sizes = torch.tensor([32, 32, 16], device=DEV)
    out2 = block_sparse_attention(q, k, v, idx, cnt, block_sizes=sizes, backend="triton")
    assert rel_l2(out2, ref) <= 1e-2


def test_torch_compile_traces_the_custom_ops():
    grid = (2, 4, 8)
    q, k, v = (rand(1, 1, math.prod(grid), 64) for _ in range(3))

    def f(q, k, v):
        return vsa_attention(q, k, v, grid, 0.5, backend="triton") * 2

    eager = f(q, k, v)
    compiled = torch.compile(f, backend="aot_eager")(q, k, v)
    assert rel_l2(compiled, eager) <= 1e-6
    # the ops have fake kernels: shapes come out without running anything
    from torch._subclasses.fake_tensor import FakeTensorMode

    lay = cube_tiling(grid, device=DEV).layout
    with FakeTensorMode(allow_non_fake_inputs=True):
        fq = torch.empty(1, 1, math.prod(grid), 64, dtype=torch.bfloat16, device=DEV)
        counts = torch.ones(1, dtype=torch.int32, device=DEV)
        idx, cnt, coarse, ent, kr, vr = torch.ops.usv.vsa_select(fq, fq, fq, lay.token_table, lay.block_sizes,
                                                                counts, 1, lay.block, True, 0.1, True, True, True)
        assert idx.shape == (1, 1, 2, 1) and coarse.shape == (1, 1, 2, 64) and ent.shape == (1, 1, 2)
        assert kr.shape == vr.shape == (1, 2 * lay.block, 64) and kr.dtype == fq.dtype
        o, lse = torch.ops.usv.bsa_fwd(fq, fq, fq, idx, cnt, lay.token_table, lay.block_sizes, lay.block, True, 0.1)
        assert o.shape == fq.shape and lse.shape == (1, 1, 64)


def test_triton_path_rejects_what_kernels_lack():
    grid = (2, 4, 4)
    q = rand(1, 1, 32, 64, dtype=torch.float32)
    with pytest.raises(ValueError, match="q"):
        vsa_attention(q, q, q, grid, 0.5, backend="triton")
    q = rand(1, 1, 32, 96)
    with pytest.raises(ValueError, match="head dim"):
        vsa_attention(q, q, q, grid, 0.5, backend="triton")
    q = rand(1, 1, 32, 64)
    with pytest.raises(ValueError, match="cube"):
        vsa_attention(q, q, q, grid, 0.5, cube=(2, 8, 16), backend="triton")


# --------------------------------------------------------------------------- full size, GPU only
@pytest.mark.gpu
def test_gpu_supports():
    assert supports(rand(1, 1, 64, 128)) == (True, "")
    assert not supports(rand(1, 1, 64, 80))[0]
    assert not supports(rand(1, 1, 64, 128, dtype=torch.float32))[0]


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [0.125, 0.05])
@pytest.mark.parametrize("pack_edges", [True, False])
def test_gpu_wan_480p_forward(keep, pack_edges):
    grid = (21, 30, 52)
    q, k, v = (rand(1, 12, math.prod(grid), 128) for _ in range(3))
    (out, h), (ref, h_ref) = both(vsa_attention, q, k, v, grid, keep, return_stats=True, pack_edges=pack_edges)
    assert rel_l2(out, ref) <= 1e-2
    assert torch.allclose(h, h_ref, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_source", ["rows", "tma"], indirect=True)
def test_gpu_wan_480p_forward_from_block_ordered_copies(kv_source):
    grid = (21, 30, 52)
    q, k, v = (rand(1, 12, math.prod(grid), 128) for _ in range(3))
    keep = torch.tensor([0.05, 0.125, 0.25] * 4, device=DEV)
    out, ref = both(vsa_attention, q, k, v, grid, keep)
    assert rel_l2(out, ref) <= 1e-2


@pytest.mark.gpu
def test_gpu_forward_d64_fp16_gate_per_head_keep_batch2():
    grid = (21, 30, 52)
    N = math.prod(grid)
    q, k, v = (rand(2, 4, N, 64, dtype=torch.float16) for _ in range(3))
    gate = rand(2, 4, N, 64, dtype=torch.float16)
    keep = torch.tensor([0.05, 0.1, 0.25, 1.0], device=DEV)
    out, ref = both(vsa_attention, q, k, v, grid, keep, gate=gate)
    assert rel_l2(out, ref) <= 1e-2


@pytest.mark.gpu
def test_gpu_gradients():
    grid = (9, 30, 52)
    N = math.prod(grid)
    base = [rand(1, 2, N, 128).float() for _ in range(3)]
    grads = {}
    for backend, dtype in (("triton", torch.bfloat16), ("reference", torch.float32)):
        q, k, v = (t.to(dtype).requires_grad_() for t in base)
        out = vsa_attention(q, k, v, grid, 0.125, backend=backend)
        out.backward(torch.ones_like(out) * base[0].to(dtype))
        grads[backend] = [out.detach()] + [t.grad for t in (q, k, v)]
    for name, a, b in zip(("out", "dq", "dk", "dv"), grads["triton"], grads["reference"]):
        assert rel_l2(a, b) <= 2e-2, name


@pytest.mark.gpu
def test_gpu_blocked_merged_sizes():
    tl = cube_tiling((21, 30, 52), device=DEV)
    g = torch.Generator(device=DEV).manual_seed(0)
    sizes = torch.randint(1, 65, (tl.num_cubes,), device=DEV, generator=g)
    sizes = torch.minimum(sizes, tl.block_sizes.long())
    N = int(sizes.sum())
    q, k, v = (rand(1, 12, N, 128) for _ in range(3))
    out, ref = both(vsa_attention_blocked, q, k, v, sizes, 0.125)
    assert rel_l2(out, ref) <= 1e-2
    assert blocked_layout(sizes).num_tokens == N
