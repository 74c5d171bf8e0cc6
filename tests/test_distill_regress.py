"""DMD's regression term in python3 -m usv_core.distill (--regress): pairs of noise and the
teacher's own sample from it, a student whose first step is pulled towards those samples, all of
it resumable and refused where it cannot serve."""

import json

import pytest
import torch
from safetensors import safe_open

from test_distill import one_thread  # noqa: F401  (autouse: one thread on two shared cores)
from usv_core.distill.config import from_args
from usv_core.distill.dist import Dist
from usv_core.distill.loop import Trainer
from usv_core.distill.pairs import regression_loss
from usv_core.world.sampling import sample


def regress_trainer(tmp_path, *extra):
    cfg = from_args(["--out", str(tmp_path), "--tiny", "--keep", "0.25", "--merge", "0.5", "--regress", "1", *extra])
    return Trainer(cfg, Dist())


def test_the_pairs_are_the_teachers_samples_from_their_noise(tmp_path):
    tr = regress_trainer(tmp_path, "--regress-pairs", "5", "--regress-steps", "3")
    pairs = tr.pairs
    assert len(pairs) == 5 and pairs.noise.shape == pairs.target.shape == (5, *tr.cfg.latent_shape())
    uncond = tr.data._uncond.expand(2, -1, -1)
    with torch.no_grad():
        again = sample(tr.teacher, pairs.cond[:2], uncond, pairs.noise[:2], steps=3, cfg=tr.cfg.cfg)
    torch.testing.assert_close(pairs.target[:2], again, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(pairs.target).all() and not torch.allclose(pairs.target, pairs.noise)
    # each pair has its own noise and caption
    assert float((pairs.noise[0] - pairs.noise[1]).abs().mean()) > 0.5


def test_the_regression_term_pulls_the_students_first_step_towards_the_teacher(tmp_path):
    tr = regress_trainer(tmp_path, "--lr", "1e-3")
    z, target, cond = tr.pairs.batch(torch.Generator().manual_seed(0), 2)
    losses = []
    for _ in range(6):
        loss = regression_loss(tr.student, z, target, cond, tr.sigmas, tr.sparsity_at)
        tr.opt_student.zero_grad(set_to_none=True)
        loss.backward()
        if not losses:
            assert all(p.grad is not None for p in tr.student.parameters() if p.requires_grad)
        tr.opt_student.step()
        losses.append(float(loss.detach()))
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < 0.9 * losses[0], losses


def test_a_regression_run_resumes_exactly(tmp_path):
    def run(out, *extra):
        cfg = from_args(["--out", str(out), "--tiny", "--steps", "3", "--save-every", "1", "--regress", "0.5", *extra])
        return Trainer(cfg, Dist()).run(say=lambda _msg: None)

    run(tmp_path / "whole")
    run(tmp_path / "split", "--stop-at-step", "2")
    run(tmp_path / "split")
    with safe_open(str(tmp_path / "whole" / "ckpt" / "state.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "split" / "ckpt" / "state.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for k in a.keys():
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    with open(tmp_path / "split" / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert [r["step"] for r in logged] == [1, 2, 3] and all(r["regress"] > 0 for r in logged)


def test_a_run_without_the_term_refuses_to_resume_with_it(tmp_path):
    Trainer(from_args(["--out", str(tmp_path), "--tiny", "--steps", "2"]), Dist()).run(say=lambda _msg: None)
    with pytest.raises(SystemExit, match="regress.*fresh --out"):
        Trainer(from_args(["--out", str(tmp_path), "--tiny", "--steps", "3", "--regress", "1"]), Dist())


def test_regression_settings_it_cannot_serve_say_what_to_change(tmp_path):
    with pytest.raises(SystemExit, match="--regress must be >= 0"):
        from_args(["--out", str(tmp_path), "--regress", "-1"])
    with pytest.raises(SystemExit, match="--regress-pairs and --regress-steps >= 1"):
        from_args(["--out", str(tmp_path), "--regress", "1", "--regress-pairs", "0"])
