"""Sequence-parallel VSA (usv_core.parallel) with 2 and 3 CPU processes over gloo: every rank's
output shard, gathered, equals one process's vsa_attention; per-head keep ratios and entropies
follow the heads; token merging plans the same grouping on every rank; heads that do not divide by
the world size are refused with the sizes that would work."""

import math
import os

import pytest
import torch

from usv_core.attention import vsa_attention, vsa_attention_blocked
from usv_core.merge import plan_merge
from usv_core.parallel import gather_tokens, plan_merge_parallel, sequence_parallel_vsa, shard_tokens, spawn

GRID = (3, 6, 10)  # 180 tokens: not a multiple of 2 or 3 cubes, edge cubes in h and w
HEADS = 6


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(GRID)
    q, k, v = (torch.randn(2, HEADS, n, 16, generator=g) for _ in range(3))
    keep = torch.tensor([0.25, 0.5, 0.1, 1.0, 0.3, 0.2])
    gate = torch.rand(2, HEADS, n, 16, generator=g)
    metric = torch.randn(2, n, 24, generator=g)
    return q, k, v, keep, gate, metric


def _rank(rank, world, out_dir):
    q, k, v, keep, gate, metric = inputs()
    res = {}
    shard = lambda t: shard_tokens(t, dim=2)  # noqa: E731
    out, ent = sequence_parallel_vsa(shard(q), shard(k), shard(v), keep, grid=GRID, gate=shard(gate),
                                     return_stats=True)
    res["vsa"] = gather_tokens(out, q.shape[2], dim=2)
    res["entropy"] = ent
    res["float_keep"] = gather_tokens(sequence_parallel_vsa(shard(q), shard(k), shard(v), 0.25, grid=GRID),
                                      q.shape[2], dim=2)

    # token merging: the same plan everywhere, VSA on this rank's shard of the merged sequence
    plan = plan_merge_parallel(shard_tokens(metric, dim=1), GRID, 0.5)
    res["dst_index"] = plan.dst_index

    def merged(t):  # (B, heads, N, D) -> this rank's shard of the merged sequence
        b, h, n, d = t.shape
        m = plan.merge(t.transpose(1, 2).reshape(b, n, h * d)).view(b, plan.num_merged, h, d).transpose(1, 2)
        return shard_tokens(m, dim=2)

    out = sequence_parallel_vsa(merged(q), merged(k), merged(v), 0.4, block_sizes=plan.block_sizes)
    res["merged_vsa"] = gather_tokens(out, plan.num_merged, dim=2)

    try:
        sequence_parallel_vsa(shard(q[:, :4]), shard(k[:, :4]), shard(v[:, :4]), 0.5, grid=GRID)
        res["error"] = None
    except ValueError as e:
        res["error"] = str(e)
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [2, 3])
def test_sequence_parallel_vsa_equals_one_process(tmp_path, world):
    spawn(_rank, world, str(tmp_path))
    q, k, v, keep, gate, metric = inputs()
    want, want_ent = vsa_attention(q, k, v, GRID, keep, gate=gate, return_stats=True)
    plan = plan_merge(metric, GRID, 0.5)

    def merged(t):
        b, h, n, d = t.shape
        return plan.merge(t.transpose(1, 2).reshape(b, n, h * d)).view(b, plan.num_merged, h, d).transpose(1, 2)

    want_merged = vsa_attention_blocked(merged(q), merged(k), merged(v), plan.block_sizes, 0.4)
    want_float = vsa_attention(q, k, v, GRID, 0.25)
    for rank in range(world):
        res = torch.load(tmp_path / f"rank{rank}.pt")
        # heads are computed independently, so the sharded run agrees with one process to rounding
        torch.testing.assert_close(res["vsa"], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["entropy"], want_ent, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(res["float_keep"], want_float, rtol=1e-5, atol=1e-6)
        assert torch.equal(res["dst_index"], plan.dst_index), "a rank planned another grouping than one process"
        torch.testing.assert_close(res["merged_vsa"], want_merged, rtol=1e-5, atol=1e-6)
        if 4 % world:
            assert res["error"] and "4 heads do not divide by a world size of 3" in res["error"], res["error"]
            assert "[1, 2, 4]" in res["error"]
        else:
            assert res["error"] is None
    # the check has teeth: sparse selection differs from dense here
    assert not torch.allclose(want_float, vsa_attention(q, k, v, GRID, 1.0), atol=1e-3)


def test_one_process_without_a_process_group_is_plain_vsa():
    q, k, v, keep, gate, _ = inputs(1)
    out = sequence_parallel_vsa(q, k, v, keep, grid=GRID, gate=gate)
    assert torch.equal(out, vsa_attention(q, k, v, GRID, keep, gate=gate))
    with pytest.raises(ValueError, match="exactly one of grid"):
        sequence_parallel_vsa(q, k, v, 0.5)
