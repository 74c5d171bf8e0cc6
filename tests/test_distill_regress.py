"""DMD's regression term in python3 -m usv_core.distill (--regress): pairs of noise and the
teacher's own sample from it (with --regress-at all, its states on the way), a student pulled
towards those samples, all of it resumable and refused where it cannot serve."""

import pytest
import torch

from test_distill import one_thread  # noqa: F401  (autouse: one thread on two shared cores)
from test_distill_resume import stopped_and_resumed
from usv_core.distill.config import from_args
from usv_core.distill.dist import Dist
from usv_core.distill import pairs as pairs_module
from usv_core.distill.loop import PAIR_SET, Trainer
from usv_core.distill.losses import guided_velocity
from usv_core.distill.pairs import TeacherPairs, regression_loss
from usv_core.world.sampling import sample, sigmas


def regress_trainer(tmp_path, *extra):
    cfg = from_args(["--out", str(tmp_path), "--tiny", "--keep", "0.25", "--merge", "0.5", "--regress", "1", *extra])
    return Trainer(cfg, Dist())


def test_the_pairs_are_the_teachers_samples_from_their_noise(tmp_path):
    tr = regress_trainer(tmp_path, "--regress-pairs", "5", "--regress-steps", "3")
    pairs = tr.pairs
    noise = pairs.states[:, 0]
    assert len(pairs) == 5 and pairs.states.shape == (5, 1, *tr.cfg.latent_shape()) and pairs.sigmas_at == [1.0]
    uncond = tr.data._uncond.expand(2, -1, -1)
    with torch.no_grad():  # the world's own sampler, as the teacher's row is scored
        again = sample(tr.teacher, pairs.cond[:2], uncond, noise[:2], steps=3, cfg=tr.cfg.cfg)
    torch.testing.assert_close(pairs.target[:2], again, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(pairs.target).all() and not torch.allclose(pairs.target, noise)
    # each pair has its own noise and caption
    assert float((noise[0] - noise[1]).abs().mean()) > 0.5


def test_with_regress_at_all_the_pairs_hold_the_teachers_states_at_the_schedules_sigmas(tmp_path):
    tr = regress_trainer(tmp_path, "--regress-pairs", "3", "--regress-steps", "3", "--regress-at", "all")
    pairs, cfg = tr.pairs, tr.cfg
    assert pairs.sigmas_at == tr.sigmas[:-1] and pairs.states.shape == (3, len(tr.sigmas) - 1, *cfg.latent_shape())
    # the Euler solve on the teacher's 3 sigmas with the schedule's added: from each recorded state
    # at its sigma, the rest of that solve lands on the pair's sample
    grid = sorted(set(sigmas(3).tolist()) | set(tr.sigmas[1:-1]), reverse=True)
    uncond = tr.data._uncond.expand(3, -1, -1)
    for k, sigma in enumerate(pairs.sigmas_at):
        x = pairs.states[:, k]
        with torch.no_grad():
            for s, s_next in zip(grid, grid[1:]):
                if s <= sigma + 1e-6:
                    v = guided_velocity(tr.teacher, x, torch.full((3,), s), pairs.cond, uncond, cfg.cfg)
                    x = x + (s_next - s) * v
        torch.testing.assert_close(x, pairs.target, rtol=1e-4, atol=1e-5)
    # and the states move from the noise towards the sample
    gaps = [float((pairs.states[:, k] - pairs.target).abs().mean()) for k in range(len(pairs.sigmas_at))]
    assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps


@pytest.mark.parametrize("at", ["first", "all"])
def test_the_regression_term_pulls_the_student_towards_the_teacher(tmp_path, at):
    tr = regress_trainer(tmp_path, "--lr", "1e-3", "--regress-at", at)
    states, target, cond = tr.pairs.batch(torch.Generator().manual_seed(0), 2)
    losses = []
    for _ in range(6):
        loss = regression_loss(tr.student, states, target, cond, tr.pairs.sigmas_at, tr.sparsity_at)
        tr.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in tr.student.parameters() if p.requires_grad)
        tr.opt_student.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses


def test_a_regression_run_resumes_exactly(tmp_path):
    _, logged = stopped_and_resumed(tmp_path, "--regress", "0.5", "--regress-at", "all")
    assert [r["step"] for r in logged] == [1, 2, 3] and all(r["regress"] > 0 for r in logged)


def test_the_pairs_are_kept_beside_the_checkpoint_and_read_back(tmp_path, monkeypatch):
    first = regress_trainer(tmp_path, "--regress-at", "all").pairs
    assert first.loaded == 0 and (tmp_path / "ckpt" / "pairs_rank0.safetensors").exists()

    def no_teacher(*args, **kwargs):
        raise AssertionError("the teacher sampled pairs the file already held")

    monkeypatch.setattr(pairs_module, "teacher_solve", no_teacher)
    again = regress_trainer(tmp_path, "--regress-at", "all").pairs
    assert again.loaded == len(first) == 8
    for name in ("states", "target", "cond"):
        assert torch.equal(getattr(again, name), getattr(first, name)), name


def test_pairs_stopped_half_way_keep_what_was_made_and_continue_the_same_set(tmp_path, monkeypatch):
    tr = regress_trainer(tmp_path / "run", "--regress-pairs", "2")
    shape = tr.cfg.latent_shape()

    def make(cache="", **kw):
        return TeacherPairs(tr.teacher, tr.data, 5, shape, *tr._generators(0, PAIR_SET), tr.device, sigmas_at=[1.0],
                            steps=2, cfg=5.0, autocast=tr._autocast, chunk=2, cache=cache, save_seconds=0, **kw)

    whole = make()
    real, calls = pairs_module.teacher_solve, []

    def stopped_after_one_chunk(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt  # the command was stopped while sampling
        return real(*args, **kwargs)

    cache = str(tmp_path / "pairs.safetensors")
    monkeypatch.setattr(pairs_module, "teacher_solve", stopped_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        make(cache)
    monkeypatch.setattr(pairs_module, "teacher_solve", real)
    resumed = make(cache)
    assert resumed.loaded == 2 and len(resumed) == 5
    for name in ("states", "target", "cond"):
        assert torch.equal(getattr(resumed, name), getattr(whole, name)), name
    # pairs made another way (here: other teacher steps) are not taken for these
    other = TeacherPairs(tr.teacher, tr.data, 5, shape, *tr._generators(0, PAIR_SET), tr.device, sigmas_at=[1.0],
                         steps=3, cfg=5.0, autocast=tr._autocast, chunk=2, cache=cache)
    assert other.loaded == 0


def test_a_run_without_the_term_refuses_to_resume_with_it(tmp_path, monkeypatch):
    Trainer(from_args(["--out", str(tmp_path), "--tiny", "--steps", "2"]), Dist()).run(say=lambda _msg: None)

    def no_teacher(*args, **kwargs):
        raise AssertionError("pairs were sampled for a run that is then refused")

    monkeypatch.setattr(pairs_module, "teacher_solve", no_teacher)  # refused before the setup's work
    with pytest.raises(SystemExit, match="regress.*fresh --out"):
        Trainer(from_args(["--out", str(tmp_path), "--tiny", "--steps", "3", "--regress", "1"]), Dist())


def test_regression_settings_it_cannot_serve_say_what_to_change(tmp_path):
    with pytest.raises(SystemExit, match="--regress must be >= 0"):
        from_args(["--out", str(tmp_path), "--regress", "-1"])
    with pytest.raises(SystemExit, match="--regress-pairs and --regress-steps >= 1"):
        from_args(["--out", str(tmp_path), "--regress", "1", "--regress-pairs", "0"])
    with pytest.raises(SystemExit, match="--regress-at must be first or all"):
        from_args(["--out", str(tmp_path), "--regress", "1", "--regress-at", "last"])
