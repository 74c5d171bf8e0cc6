"""Cube tiling: raster <-> cube order, edge cubes, token tables, variable block sizes."""

import itertools
import math

import pytest
import torch

from usv_core.tiling import blocked_layout, cube_tiling, from_cube_order, next_block, num_blocks, to_cube_order


def _cube_of(t, h, w, cube, cube_grid):
    ct, ch, cw = cube
    _, nh, nw = cube_grid
    return ((t // ct) * nh + h // ch) * nw + w // cw


@pytest.mark.parametrize("grid,cube", [((5, 7, 9), (4, 4, 4)), ((21, 30, 52), (4, 4, 4)), ((3, 2, 5), (2, 3, 2)),
                                       ((4, 4, 4), (4, 4, 4)), ((1, 1, 1), (4, 4, 4))])
def test_tiling_matches_definition(grid, cube):
    T, H, W = grid
    tl = cube_tiling(grid, cube)
    nt, nh, nw = (-(-g // c) for g, c in zip(grid, cube))
    assert tl.cube_grid == (nt, nh, nw) and tl.num_cubes == nt * nh * nw and tl.num_tokens == T * H * W
    # expected members of every cube, in raster order, straight from the coordinates
    members = [[] for _ in range(tl.num_cubes)]
    for t, h, w in itertools.product(range(T), range(H), range(W)):
        members[_cube_of(t, h, w, cube, tl.cube_grid)].append((t * H + h) * W + w)
    sizes = [len(m) for m in members]
    assert tl.block_sizes.tolist() == sizes
    assert min(sizes) >= 1 and sum(sizes) == T * H * W
    assert tl.perm.tolist() == [r for m in members for r in m]
    assert tl.block_starts.tolist() == [0] + list(itertools.accumulate(sizes))
    lay = tl.layout
    assert lay.block == next_block(math.prod(cube)) and lay.num_blocks == tl.num_cubes
    for c, m in enumerate(members):
        row = lay.token_table[c].tolist()
        # the real tokens first, in raster order, then padding: the kernels' block-ordered copies rely on it
        assert row[: sizes[c]] == m and all(x == -1 for x in row[sizes[c]:])
        for r in m:
            assert lay.block_of_token[r].item() == c


def test_edge_cube_sizes_of_wan_grid():
    tl = cube_tiling((21, 30, 52), (4, 4, 4))
    assert tl.cube_grid == (6, 8, 13)
    sizes = tl.block_sizes.view(6, 8, 13)
    assert sizes[0, 0, 0] == 64
    assert sizes[5, 0, 0] == 16  # 21 = 5 * 4 + 1 frames: the last cube row is one frame deep
    assert sizes[0, 7, 0] == 32  # 30 = 7 * 4 + 2 rows
    assert sizes[5, 7, 12] == 8
    assert int(sizes.sum()) == 21 * 30 * 52


@pytest.mark.parametrize("grid,cube", [((21, 30, 52), (4, 4, 4)), ((21, 45, 80), (4, 4, 4)), ((5, 7, 9), (4, 4, 4)),
                                       ((3, 5, 3), (2, 2, 2)), ((9, 16, 16), (4, 4, 4)), ((1, 1, 1), (4, 4, 4))])
def test_packed_layout_joins_partial_cubes_of_a_row(grid, cube):
    tl = cube_tiling(grid, cube)
    vol = math.prod(cube)
    nt, nh, nw = tl.cube_grid
    sizes = tl.block_sizes.tolist()
    p = tl.packed
    assert p.block == tl.layout.block and p.num_tokens == tl.num_tokens
    # every packed block is a run of consecutive cubes of one cube row, in cube order
    cube_of = tl.layout.block_of_token
    runs = [sorted(set(cube_of[p.token_table[b][p.token_table[b] >= 0].long()].tolist())) for b in range(p.num_blocks)]
    assert [c for r in runs for c in r] == list(range(tl.num_cubes))
    for b, r in enumerate(runs):
        assert r == list(range(r[0], r[-1] + 1)) and len({c // nw for c in r}) == 1
        assert p.block_sizes[b] == sum(sizes[c] for c in r) <= vol
        assert len(r) == 1 or all(sizes[c] < vol for c in r)
        toks = p.token_table[b][: p.block_sizes[b]].long()
        assert (p.token_table[b][p.block_sizes[b]:] == -1).all() and (p.block_of_token[toks] == b).all()
    # greedy: a partial cube starts a new block only when the one before it is full or in another row
    for b in range(1, p.num_blocks):
        first, prev_last = runs[b][0], runs[b - 1][-1]
        if sizes[first] < vol and first // nw == prev_last // nw:
            assert int(p.block_sizes[b - 1]) + sizes[first] > vol
    assert num_blocks(grid, cube) == p.num_blocks and num_blocks(grid, cube, pack_edges=False) == tl.num_cubes


def test_packed_wan_grid_is_nearly_full_tiles():
    p = cube_tiling((21, 30, 52)).packed
    assert p.num_blocks == 520  # 455 full cubes; the edge layers of 624 cubes become 65 blocks
    assert (p.num_blocks * 64 / p.num_tokens) ** 2 < 1.04


def test_round_trip_and_cache():
    grid = (5, 7, 9)
    x = torch.randn(2, 3, 5 * 7 * 9, 8)
    y = to_cube_order(x, grid)
    assert not torch.equal(x, y)
    assert torch.equal(from_cube_order(y, grid), x)
    # cube order groups each cube's tokens contiguously
    tl = cube_tiling(grid)
    s = tl.block_starts
    assert torch.equal(y[:, :, s[1]:s[2]], x[:, :, tl.layout.token_table[1][: tl.block_sizes[1]].long()])
    assert cube_tiling(grid) is cube_tiling(list(grid), (4, 4, 4))
    assert cube_tiling(grid, (2, 2, 2)) is not cube_tiling(grid)


def test_blocked_layout():
    sizes = torch.tensor([3, 1, 5, 2])
    lay = blocked_layout(sizes)
    assert lay.num_tokens == 11 and lay.num_blocks == 4 and lay.block == 16 and lay.max_block_size == 5
    assert lay.token_table[2, :6].tolist() == [4, 5, 6, 7, 8, -1]
    assert lay.block_of_token.tolist() == [0, 0, 0, 1, 2, 2, 2, 2, 2, 3, 3]
    assert lay.block_sizes.tolist() == [3, 1, 5, 2]


@pytest.mark.parametrize("bad", [torch.tensor([2, 0, 1]), torch.tensor([[1, 2]]), torch.tensor([1.0, 2.0]),
                                 torch.tensor([], dtype=torch.long)])
def test_blocked_layout_rejects(bad):
    with pytest.raises(ValueError):
        blocked_layout(bad)


@pytest.mark.parametrize("grid", [(0, 2, 2), (2, 2), "abc", (1, -1, 3)])
def test_bad_grid(grid):
    with pytest.raises(ValueError, match="grid"):
        cube_tiling(grid)
