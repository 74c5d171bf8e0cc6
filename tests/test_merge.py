"""Cube-local token merging: the plan's algebra against a naive per-cube loop on tiny grids."""

import math

import pytest
import torch

from usv_core.merge import MergePlan, _destination_priority, plan_merge


def cube_of(pos, grid, cube):
    T, H, W = grid
    ct, ch, cw = cube
    nh, nw = -(-H // ch), -(-W // cw)
    t, h, w = pos // (H * W), (pos // W) % H, pos % W
    return ((t // ct) * nh + h // ch) * nw + w // cw


def naive_removed(counts, ratio):
    """Largest remainder, one cube at a time: total round(ratio * N), each cube keeps one."""
    ideal = [ratio * n for n in counts]
    removed = [math.floor(x) for x in ideal]
    need = round(ratio * sum(counts)) - sum(removed)
    order = sorted(range(len(counts)), key=lambda c: (-(ideal[c] - removed[c]), c))
    for c in order:
        if need <= 0:
            break
        if removed[c] < counts[c] - 1:
            removed[c] += 1
            need -= 1
    return removed


def naive_groups(metric, pos, grid, cube, ratio, share=0.25):
    """One batch element: {representative raster index: [input indices]}, loop per cube."""
    length = metric.shape[0]
    cubes = {}
    for i in range(length):
        cubes.setdefault(int(cube_of(pos[i], grid, cube)), []).append(i)
    ids = sorted(cubes)
    removed = naive_removed([len(cubes[c]) for c in ids], ratio)
    prio = _destination_priority(pos, grid, cube)
    groups = {}
    for c, r in zip(ids, removed):
        members = sorted(cubes[c], key=lambda i: int(prio[i]))
        n = len(members)
        d = min(max(1, math.ceil(n * share)), n - r)
        dst, src = members[:d], members[d:]
        for j in dst:
            groups[int(pos[j])] = [j]
        best = []
        for s in src:
            sims = [torch.nn.functional.cosine_similarity(metric[s], metric[j], dim=0).item() for j in dst]
            k = max(range(d), key=lambda k: sims[k])
            best.append((sims[k], s, dst[k]))
        best.sort(key=lambda e: -e[0])
        for rank, (_, s, j) in enumerate(best):
            if rank < r:
                groups[int(pos[j])].append(s)
            else:
                groups[int(pos[s])] = [s]
    return groups


def plan_groups(plan, b):
    groups = {}
    for i, m in enumerate(plan.dst_index[b].tolist()):
        groups.setdefault(int(plan.positions[b, m]), []).append(i)
    return groups


def check_structure(plan, grid, cube, input_pos=None):
    """Invariants every plan must satisfy, per batch element."""
    n = math.prod(grid)
    counts = torch.bincount(cube_of(torch.arange(n), grid, cube))
    assert plan.block_sizes.dim() == 1 and int(plan.block_sizes.min()) >= 1
    assert int(plan.block_sizes.sum()) == plan.num_merged
    assert plan.positions.shape == (plan.batch, plan.num_merged)
    assert plan.sizes.shape == (plan.batch, plan.num_merged)
    expected_cube = torch.repeat_interleave(torch.arange(len(plan.block_sizes)), plan.block_sizes.long())
    for b in range(plan.batch):
        pos = plan.positions[b]
        assert torch.equal(cube_of(pos, grid, cube), expected_cube)  # grouped by cube, in order
        same_cube = expected_cube[1:] == expected_cube[:-1]
        assert bool((pos[1:] > pos[:-1])[same_cube].all())  # raster order inside a cube
        assert torch.allclose(plan.sizes[b].sum(), torch.tensor(float(n)))
        src = input_pos[b if input_pos.shape[0] > 1 else 0] if input_pos is not None else torch.arange(n)
        for m, members in plan_groups(plan, b).items():
            cubes = cube_of(src[members], grid, cube)
            assert bool((cubes == cubes[0]).all())  # a group never leaves its cube
            assert m in src[members].tolist()  # the representative is a member
    assert int(counts.numel()) == len(plan.block_sizes)


@pytest.mark.parametrize("grid,cube,ratio", [
    ((4, 4, 4), (4, 4, 4), 0.5),
    ((5, 7, 9), (4, 4, 4), 0.5),
    ((3, 5, 6), (4, 4, 4), 0.3),
    ((5, 7, 9), (2, 3, 2), 0.6),
    ((5, 7, 9), (4, 4, 4), 0.9),
])
def test_groups_match_naive_per_cube_loop(grid, cube, ratio):
    torch.manual_seed(0)
    n = math.prod(grid)
    metric = torch.randn(2, n, 6)
    plan = plan_merge(metric, grid, ratio, cube)
    check_structure(plan, grid, cube)
    for b in range(2):
        expected = naive_groups(metric[b], torch.arange(n), grid, cube, ratio)
        got = plan_groups(plan, b)
        assert {k: sorted(v) for k, v in got.items()} == {k: sorted(v) for k, v in expected.items()}
    assert plan.num_merged == n - sum(naive_removed(torch.bincount(cube_of(torch.arange(n), grid, cube)).tolist(), ratio))


def test_group_means_and_copy_back_exact():
    torch.manual_seed(1)
    grid = (5, 7, 9)
    n = math.prod(grid)
    metric, x = torch.randn(2, n, 8), torch.randn(2, n, 5)
    plan = plan_merge(metric, grid, 0.5)
    y = plan.merge(x)
    assert y.shape == (2, plan.num_merged, 5) and y.dtype == torch.float32
    for b in range(2):
        for m in range(plan.num_merged):
            members = (plan.dst_index[b] == m).nonzero().flatten()
            assert len(members) == int(plan.sizes[b, m])
            torch.testing.assert_close(y[b, m], x[b, members].mean(0))
    z = torch.randn(2, plan.num_merged, 5)
    back = plan.unmerge(z)
    assert back.shape == (2, n, 5)
    for b in range(2):
        for i in range(n):
            assert torch.equal(back[b, i], z[b, plan.dst_index[b, i]])
    # unmerge(merge(x)) is a projection: x constant on groups comes back unchanged
    flat = plan.unmerge(y)
    torch.testing.assert_close(plan.unmerge(plan.merge(flat)), flat)


def test_counts_rounding_and_keep_one():
    grid = (5, 7, 9)
    n = math.prod(grid)
    counts = torch.bincount(cube_of(torch.arange(n), grid, (4, 4, 4)))
    for ratio in (0.1, 0.25, 0.5, 0.77, 0.9):
        plan = plan_merge(torch.randn(1, n, 4), grid, ratio)
        removed = counts - plan.block_sizes.long()
        assert plan.num_merged == n - round(ratio * n)  # achievable here: total matches exactly
        assert bool(((removed.double() - ratio * counts.double()).abs() < 1).all())
        assert bool((plan.block_sizes >= 1).all())


def test_planted_duplicates_merge_into_their_destination():
    # every source is a noisy copy of one destination of its cube: matching must find it
    torch.manual_seed(2)
    grid = (4, 8, 8)
    n = math.prod(grid)
    prio_order = torch.argsort(_destination_priority(torch.arange(n), grid, (4, 4, 4)) + 1000 * cube_of(torch.arange(n), grid, (4, 4, 4)))
    metric = torch.empty(1, n, 32)
    truth = torch.empty(n, dtype=torch.long)
    for c in range(4):
        members = prio_order[c * 64:(c + 1) * 64]
        dst = members[:16]
        metric[0, dst] = torch.randn(16, 32)
        pick = torch.randint(0, 16, (48,))
        metric[0, members[16:]] = metric[0, dst[pick]] + 0.01 * torch.randn(48, 32)
        truth[dst], truth[members[16:]] = dst, dst[pick]
    plan = plan_merge(metric, grid, 0.75)
    assert torch.equal(plan.representatives()[0], truth)


def test_batch_elements_plan_independently_with_shared_block_sizes():
    torch.manual_seed(3)
    grid = (3, 5, 6)
    metric = torch.randn(3, math.prod(grid), 8)
    plan = plan_merge(metric, grid, 0.5)
    assert not torch.equal(plan.dst_index[0], plan.dst_index[1])
    for b in range(3):
        single = plan_merge(metric[b:b + 1], grid, 0.5)
        assert torch.equal(single.dst_index[0], plan.dst_index[b])
        assert torch.equal(single.positions[0], plan.positions[b])
        assert torch.equal(single.block_sizes, plan.block_sizes)
    # a batch-1 plan broadcasts over a larger batch of x
    x = torch.randn(4, math.prod(grid), 3)
    single = plan_merge(metric[:1], grid, 0.5)
    torch.testing.assert_close(single.merge(x)[2], single.merge(x[2:3])[0])


@pytest.mark.parametrize("grid", [(4, 4, 4), (5, 7, 9)])
def test_ratio_zero_is_identity(grid):
    n = math.prod(grid)
    metric, x = torch.randn(2, n, 4), torch.randn(2, n, 3)
    plan = plan_merge(metric, grid, 0.0)
    assert plan.is_identity and not plan.cube_ordered and plan.num_merged == n
    assert plan.merge(x) is x and plan.unmerge(x) is x
    assert torch.equal(plan.positions, torch.arange(n).expand(2, n))
    assert torch.equal(plan.sizes, torch.ones(2, n))
    freqs = torch.randn(1, n, 1, 4)
    assert plan.gather(freqs) is freqs


def test_ratio_extreme_keeps_one_per_cube_at_least():
    torch.manual_seed(4)
    grid = (5, 7, 9)
    n = math.prod(grid)
    x = torch.randn(2, n, 4)
    plan = plan_merge(torch.randn(2, n, 4), grid, 0.9)
    check_structure(plan, grid, (4, 4, 4))
    assert plan.num_merged == n - round(0.9 * n)
    torch.testing.assert_close(plan.merge(x).sum(1), torch.stack([
        torch.stack([x[b, plan.dst_index[b] == m].mean(0) for m in range(plan.num_merged)]).sum(0)
        for b in range(2)]))


def test_composition_gives_means_over_original_tokens():
    torch.manual_seed(5)
    grid = (5, 7, 9)
    n = math.prod(grid)
    x = torch.randn(2, n, 6)
    first = plan_merge(torch.randn(2, n, 8), grid, 0.5)
    y = first.merge(x)
    second = plan_merge(y, grid, 0.4, prior=first)
    assert second.num_tokens == first.num_merged
    assert second.num_merged == first.num_merged - round(0.4 * first.num_merged)
    check_structure(second, grid, (4, 4, 4), input_pos=first.positions)
    z = second.merge(y)
    composed = second.dst_index.gather(1, first.dst_index)  # original token -> final token
    for b in range(2):
        for m in range(second.num_merged):
            members = (composed[b] == m).nonzero().flatten()
            assert len(members) == int(second.sizes[b, m])
            torch.testing.assert_close(z[b, m], x[b, members].mean(0))
            assert int(second.positions[b, m]) in members.tolist()
    back = first.unmerge(second.unmerge(z))
    torch.testing.assert_close(back, z.gather(1, composed[..., None].expand(-1, -1, 6)))
    # the second plan's groups match the naive loop run on the merged sequence's positions
    for b in range(2):
        expected = naive_groups(y[b].float(), first.positions[b], grid, (4, 4, 4), 0.4)
        assert {k: sorted(v) for k, v in plan_groups(second, b).items()} == \
            {k: sorted(v) for k, v in expected.items()}
    # ratio 0 on a merged sequence is the identity and keeps its cube order and sizes
    same = plan_merge(y.float(), grid, 0.0, prior=first)
    assert same.is_identity and same.cube_ordered and same.merge(y) is y
    assert torch.equal(same.positions, first.positions) and torch.equal(same.sizes, first.sizes)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    torch.manual_seed(6)
    grid = (3, 5, 6)
    n = math.prod(grid)
    metric = torch.randn(2, n, 16)
    plan = plan_merge(metric.to(dtype), grid, 0.5)
    check_structure(plan, grid, (4, 4, 4))
    x = torch.randn(2, n, 8)
    y = plan.merge(x.to(dtype))
    assert y.dtype == dtype and plan.unmerge(y).dtype == dtype
    torch.testing.assert_close(y.float(), plan.merge(x), atol=2e-2, rtol=2e-2)
    # near-ties may flip in half precision, but the grouping is essentially the float one
    assert plan.similarity_to(plan_merge(metric, grid, 0.5)) > 0.8


def test_gather_positions_for_rope():
    torch.manual_seed(7)
    grid = (5, 7, 9)
    n = math.prod(grid)
    plan = plan_merge(torch.randn(2, n, 4), grid, 0.5)
    freqs = torch.randn(1, n, 1, 4, 2, 2)  # Wan's layout: (1, N, 1, D/2, 2, 2)
    got = plan.gather(freqs, dim=1)
    assert got.shape == (2, plan.num_merged, 1, 4, 2, 2)
    for b in range(2):
        assert torch.equal(got[b], freqs[0, plan.positions[b]])
    per_batch = torch.randn(2, n, 3)
    assert torch.equal(plan.gather(per_batch)[1], per_batch[1, plan.positions[1]])


def test_similarity_to_measures_plan_change():
    torch.manual_seed(8)
    grid = (5, 7, 9)
    n = math.prod(grid)
    metric = torch.randn(2, n, 16)
    plan = plan_merge(metric, grid, 0.5)
    assert plan.similarity_to(plan) == 1.0
    nudged = plan.similarity_to(plan_merge(metric + 1e-3 * torch.randn_like(metric), grid, 0.5))
    moved = plan.similarity_to(plan_merge(metric + 0.5 * torch.randn_like(metric), grid, 0.5))
    fresh = plan.similarity_to(plan_merge(torch.randn_like(metric), grid, 0.5))
    assert 1.0 >= nudged > moved > fresh >= 0.0
    assert nudged > 0.95


def test_destination_priority_is_spread():
    pos = torch.arange(64)
    order = torch.argsort(_destination_priority(pos, (4, 4, 4), (4, 4, 4)))
    t, h, w = order // 16, (order // 4) % 4, order % 4
    first8 = set(zip(t[:8].tolist(), h[:8].tolist(), w[:8].tolist()))
    assert first8 == {(a, b, c) for a in (0, 2) for b in (0, 2) for c in (0, 2)}
    # the first 16: one destination per 2x2 patch in every frame
    patch = (t[:16] * 4 + (h[:16] // 2) * 2 + w[:16] // 2)
    assert sorted(patch.tolist()) == list(range(16))
    assert (t[1], h[1], w[1]) == (2, 2, 2)  # the second destination is far from the first


def test_bad_inputs_raise_value_errors_naming_the_argument():
    grid = (2, 3, 4)
    metric = torch.randn(1, 24, 4)
    with pytest.raises(ValueError, match="ratio"):
        plan_merge(metric, grid, 0.95)
    with pytest.raises(ValueError, match="ratio"):
        plan_merge(metric, grid, -0.1)
    with pytest.raises(ValueError, match="grid"):
        plan_merge(metric, (2, 3, 5), 0.5)
    with pytest.raises(ValueError, match="grid"):
        plan_merge(metric, (2, 3), 0.5)
    with pytest.raises(ValueError, match="metric"):
        plan_merge(metric[0], grid, 0.5)
    with pytest.raises(ValueError, match="metric"):
        plan_merge(torch.zeros(1, 24, 4, dtype=torch.long), grid, 0.5)
    with pytest.raises(ValueError, match="cube"):
        plan_merge(metric, grid, 0.5, cube=(4, 0, 4))
    plan = plan_merge(metric, grid, 0.5)
    with pytest.raises(ValueError, match="metric"):
        plan_merge(metric, grid, 0.5, prior=plan)  # N must be prior's merged length
    with pytest.raises(ValueError, match="x"):
        plan.merge(torch.randn(1, 23, 4))
    assert isinstance(plan, MergePlan)


def test_unmerge_update_keeps_each_tokens_residual_and_trailing_dims():
    torch.manual_seed(9)
    grid = (3, 5, 6)
    n = math.prod(grid)
    plan = plan_merge(torch.randn(2, n, 8), grid, 0.5)
    x = torch.randn(2, n, 8)
    xm = plan.merge(x)
    block = lambda t: t + torch.tanh(t)  # a residual block: t + f(t)
    out = plan.unmerge_update(x, xm, block(xm))
    torch.testing.assert_close(out, x + plan.unmerge(torch.tanh(xm)))
    # ratio 0: exactly the block applied to x
    ident = plan_merge(torch.randn(2, n, 8), grid, 0.0)
    torch.testing.assert_close(ident.unmerge_update(x, ident.merge(x), block(ident.merge(x))), block(x))
    # trailing feature dims, e.g. per-token modulation (B, N, 6, C)
    e = torch.randn(2, n, 6, 4)
    torch.testing.assert_close(plan.merge(e).reshape(2, plan.num_merged, 24), plan.merge(e.reshape(2, n, 24)))
    assert plan.unmerge(plan.merge(e)).shape == e.shape


def test_merged_sequence_runs_through_blocked_vsa():
    # block_sizes is what VSA needs to attend over the merged sequence directly
    from usv_core.attention import vsa_attention_blocked

    torch.manual_seed(10)
    grid = (5, 7, 9)
    n = math.prod(grid)
    plan = plan_merge(torch.randn(1, n, 16), grid, 0.5)
    q, k, v = (plan.merge(torch.randn(1, n, 2 * 16)).view(1, plan.num_merged, 2, 16).transpose(1, 2)
               for _ in range(3))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(vsa_attention_blocked(q, k, v, plan.block_sizes, 1.0), dense, atol=1e-5, rtol=1e-4)
    assert vsa_attention_blocked(q, k, v, plan.block_sizes, 0.25).shape == dense.shape
