"""usv_core.policy: allocation on synthetic attention maps, the budget, caps, static mode,
determinism, refresh cadence and settings errors; usv_core.telemetry's tables and heatmap."""

import numpy as np
import pytest
import torch

from usv_core import telemetry
from usv_core.policy import (
    MERGE_STEP, Allocation, Limits, PolicyConfig, PolicyRun, allocate, attention_share, coarse_entropy,
    step_budget, work_share,
)

GRID = (4, 8, 8)
CUBE = (2, 4, 4)  # -> 2 x 2 x 2 = 8 cubes


def synthetic_qk(heads_spec, d=16, seed=0):
    """q, k (1, heads, N, d) on GRID whose coarse attention is concentrated ('peak': every query
    cube looks at one key cube) or spread ('flat': all key cubes look alike)."""
    gen = torch.Generator().manual_seed(seed)
    n = GRID[0] * GRID[1] * GRID[2]
    qs, ks = [], []
    for kind in heads_spec:
        q = 0.01 * torch.randn(n, d, generator=gen)
        k = 0.01 * torch.randn(n, d, generator=gen)
        if kind == "peak":
            direction = torch.randn(d, generator=gen)
            direction = 8.0 * direction / direction.norm()
            q = q + direction
            # keys of the first cube (t < 2, h < 4, w < 4) point where every query points
            t, h, w = torch.meshgrid(*(torch.arange(g) for g in GRID), indexing="ij")
            first = ((t < 2) & (h < 4) & (w < 4)).flatten()
            k[first] += direction
        qs.append(q)
        ks.append(k)
    return torch.stack(qs)[None], torch.stack(ks)[None]


def test_concentrated_head_gets_less_than_spread_head_and_budget_is_met():
    q, k = synthetic_qk(["peak", "flat", "peak", "flat"])
    h = coarse_entropy(q, k, GRID, CUBE)
    assert h.shape == (1, 4)
    assert h[0, 0] < 0.2 and h[0, 1] > 0.95  # the synthetic maps are what they claim
    entropy = h.mean(0).numpy()[None].repeat(3, 0)  # 3 layers with the same heads
    limits = Limits.uniform(3, 4, keep=(0.02, 1.0))
    for budget in (0.4, 0.6, 0.8):
        a = allocate(entropy, budget, limits, gamma=1.0)
        assert (a.keep[:, 0] < a.keep[:, 1]).all() and (a.keep[:, 2] < a.keep[:, 3]).all()
        assert a.work == pytest.approx(budget, abs=1e-6)
        assert work_share(a.keep, a.merge) == pytest.approx(a.work)


def test_caps_and_fixed_layers_are_respected_and_whole_cubes():
    rng = np.random.default_rng(1)
    entropy = rng.uniform(0.3, 0.99, (6, 4))
    limits = Limits(4, keep_lo=(1.0, 0.125, 0.125, 0.125, 0.125, 1.0), keep_hi=(1.0,) * 6,
                    merge_lo=(0.0,) * 6, merge_hi=(0.0, 0.5, 0.5, 0.5, 0.5, 0.0), num_cubes=64)
    a = allocate(entropy, 0.5, limits, gamma=2.0)
    assert (a.keep[0] == 1.0).all() and (a.keep[5] == 1.0).all()
    assert (a.keep >= 0.125 - 1e-12).all() and (a.keep <= 1.0).all()
    assert (a.merge >= 0).all() and (a.merge[1:5] <= 0.5 + 1e-12).all() and a.merge[0] == a.merge[5] == 0
    np.testing.assert_allclose(a.keep * 64, np.round(a.keep * 64))  # whole key cubes
    units = a.merge / MERGE_STEP
    assert np.allclose(units, np.round(units)) or len(set(a.merge[1:5])) == 1  # merge levels (or one ratio)
    assert a.work == pytest.approx(0.5, abs=0.01)


def test_unreachable_budget_saturates_and_says_so():
    limits = Limits.uniform(2, 2, keep=(0.5, 1.0))
    a = allocate(np.full((2, 2), 0.5), 0.1, limits)
    assert (a.keep == 0.5).all()
    assert a.work == pytest.approx(0.71 * 0.5 + 0.29)


def test_static_mode_is_uniform_and_gamma_zero_matches_it():
    rng = np.random.default_rng(2)
    entropy = rng.uniform(0, 1, (5, 3))
    limits = Limits.uniform(5, 3, keep=(0.02, 1.0), merge=(0.0, 0.6))
    s = allocate(entropy, 0.2, limits, mode="static")
    assert np.unique(s.keep).size == 1 and np.unique(s.merge).size == 1
    assert s.work == pytest.approx(0.2, abs=1e-6)
    g0 = allocate(entropy, 0.2, limits, gamma=0.0)
    np.testing.assert_array_equal(s.keep, g0.keep)
    np.testing.assert_array_equal(s.merge, g0.merge)
    assert isinstance(s.layer_keep(0), float)
    e = allocate(entropy, 0.2, limits)
    assert isinstance(e.layer_keep(0), torch.Tensor) and e.layer_keep(0).shape == (3,)


def test_deterministic():
    rng = np.random.default_rng(3)
    entropy = rng.uniform(0.5, 1.0, (30, 12))
    limits = Limits.uniform(30, 12, keep=(0.02, 1.0), merge=(0.0, 0.75), num_cubes=624, fixed=(0,))
    a, b = allocate(entropy, 0.2, limits), allocate(entropy.copy(), 0.2, limits)
    np.testing.assert_array_equal(a.keep, b.keep)
    np.testing.assert_array_equal(a.merge, b.merge)
    assert a.work == b.work


def test_step_budget_ramp_keeps_the_mean():
    steps = [step_budget(0.3, s, 1, 9, 0.5) for s in range(1, 10)]
    assert steps[0] == pytest.approx(0.45) and steps[-1] == pytest.approx(0.15)
    assert np.mean(steps) == pytest.approx(0.3)
    assert step_budget(0.3, 4, 1, 9, 0.0) == 0.3


def test_attention_share_of_wan_1_3b_at_480p():
    assert attention_share(1536, 8960, 21 * 30 * 52) == pytest.approx(0.70, abs=0.01)


class _Clock:
    def __init__(self):
        self.limits_calls = 0

    def limits(self):
        self.limits_calls += 1
        return Limits.uniform(3, 2, keep=(0.05, 1.0))


def test_refresh_cadence_and_measurement_schedule():
    clock = _Clock()
    run = PolicyRun(PolicyConfig(budget=0.4, refresh=3), clock.limits, first_step=1)
    # dense step 0: nothing seen yet, so dense calls measure
    assert run.wants_entropy(0)
    for layer in range(3):
        run.observe(layer, torch.tensor([[0.2, 0.9], [0.3, 0.8]]))
    measured = []
    for step in range(1, 9):
        for _call in range(2 * 3):  # two model calls x three blocks per step: one decision per step at most
            a = run.decision(step, num_steps=9)
        assert isinstance(a, Allocation) and not a.provisional
        if run.wants_entropy(step):
            measured.append(step)
    assert run.refreshed_at == [1, 4, 7]
    assert clock.limits_calls == 1
    assert measured == [3, 6]  # dense calls measure only on the step before a refresh
    assert sorted(run.decisions) == list(range(1, 9))
    # the concentrated head keeps less
    assert (run.decisions[1].keep[:, 0] < run.decisions[1].keep[:, 1]).all()


def test_decision_without_observations_is_provisional_until_entropy_arrives():
    run = PolicyRun(PolicyConfig(budget=0.5, refresh=10), lambda: Limits.uniform(2, 2, keep=(0.05, 1.0)))
    a = run.decision(0)
    assert a.provisional and np.unique(a.keep).size == 1
    run.observe(0, torch.tensor([[0.1, 0.9]]))
    b = run.decision(1)
    assert not b.provisional and run.refreshed_at == [0, 1]
    assert b.keep[0, 0] < b.keep[0, 1]


def test_static_run_never_asks_for_measurements():
    run = PolicyRun(PolicyConfig(mode="static"), lambda: Limits.uniform(2, 2, keep=(0.05, 1.0)))
    assert not run.wants_entropy(0)
    assert not run.decision(0).provisional


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 0.01}, r"budget must be a number in \[0.02, 1\]"),
    ({"budget": 1.5}, "budget"),
    ({"gamma": -1.0}, "gamma must be in"),
    ({"refresh": 0}, "refresh must be a whole number"),
    ({"refresh": 1.5}, "refresh must be a whole number"),
    ({"mode": "greedy"}, "mode must be one of"),
    ({"early": 2.0}, "early must be in"),
    ({"weight": "linear"}, "weight must be one of"),
])
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PolicyConfig(**kwargs)


def test_bad_limits_and_entropy_shapes():
    with pytest.raises(ValueError, match="keep range"):
        Limits(2, (0.0,), (1.0,), (0.0,), (0.0,))
    with pytest.raises(ValueError, match="merge range"):
        Limits(2, (0.5,), (1.0,), (0.0,), (1.0,))
    with pytest.raises(ValueError, match="entropy must be"):
        allocate(np.zeros((3, 3)), 0.5, Limits.uniform(2, 2, keep=(0.1, 1.0)))


def test_tables_summary_and_heatmap():
    ran = {(s, b) for s in range(3) for b in range(2)}
    entropy = {(1, 0): torch.tensor([[0.2, 0.4]]), (1, 1): torch.tensor([[0.8, 1.0]])}
    keep = {(1, 0): 0.25, (1, 1): torch.tensor([0.5, 1.0]), (2, 0): 0.25, (2, 1): 0.25}
    merged = {(2, 1): 0.5}
    t = telemetry.tables(3, 2, ran, entropy, keep, merged)
    assert t["keep"][:, 0].tolist() == [1.0, 1.0]  # step 0 ran dense
    assert t["keep"][1, 1] == pytest.approx(0.75) and t["entropy"][0, 1] == pytest.approx(0.3)
    assert np.isnan(t["entropy"][0, 0]) and t["tokens"][1, 2] == 0.5
    n = telemetry.summary_numbers(t, 0.7)
    assert n["attended"] == pytest.approx(np.mean([1, 1, 0.25, 0.75, 0.25, 0.25]))
    assert n["speedup"] == pytest.approx(1 / n["work"])
    img = telemetry.heatmap([t["entropy"], t["keep"], t["tokens"]])
    assert img.shape[0] == 1 and img.shape[-1] == 3 and img.dtype == torch.float32
    assert 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_full_budget_is_dense():
    limits = Limits.uniform(3, 2, keep=(0.05, 1.0), merge=(0.0, 0.5), num_cubes=16)
    a = allocate(np.full((3, 2), 0.3), 1.0, limits)
    assert (a.keep == 1.0).all() and (a.merge == 0.0).all() and a.work == 1.0
    assert a.layer_keep(0) == 1.0


def test_weight_rules_order_heads_alike_and_perplexity_is_gentler():
    h = np.array([[0.38, 0.9, 0.55, 0.75]])
    limits = Limits.uniform(1, 4, keep=(0.02, 1.0), num_cubes=32)
    ppl = allocate(h, 0.7, limits, weight="perplexity")
    power = allocate(h, 0.7, limits, weight="power")
    for a in (ppl, power):
        assert list(np.argsort(a.keep[0], kind="stable")) == [0, 2, 3, 1]  # keep grows with entropy
        assert a.work == pytest.approx(0.7, abs=0.01)
    # the perplexity weight saturates: the most concentrated head keeps more than under (1 - h)
    assert ppl.keep[0, 0] > power.keep[0, 0]
    # without a cube count the perplexity rule is the power rule
    nocubes = Limits.uniform(1, 4, keep=(0.02, 1.0))
    np.testing.assert_array_equal(allocate(h, 0.5, nocubes).keep, allocate(h, 0.5, nocubes, weight="power").keep)
