"""DMD2's GAN term in python3 -m usv_core.distill (--gan): real USV World clips encoded by the
shipped VAE, a classifier on the fake network that learns them from the student's samples, a
student pulled towards what it calls real, all of it resumable and refused where it cannot serve."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from test_distill import one_thread  # noqa: F401  (autouse: one thread on two shared cores)
from test_distill_resume import stopped_and_resumed
from usv_core.distill.config import from_args
from usv_core.distill.dist import Dist
from usv_core.distill.gan import FakeScore
from usv_core.distill.loop import Trainer


def gan_trainer(tmp_path, *extra):
    cfg = from_args(["--out", str(tmp_path), "--tiny", "--keep", "0.25", "--merge", "0.5", "--gan", "0.01", *extra])
    return Trainer(cfg, Dist())


def test_real_clips_are_encoded_latents_of_the_students_shape(tmp_path):
    tr = gan_trainer(tmp_path, "--gan-clips", "5")
    real, cond = tr.real.batch(torch.Generator().manual_seed(0), 3)
    assert len(tr.real) == 5 and real.shape == (3, *tr.cfg.latent_shape())
    assert cond.shape[0] == 3 and torch.isfinite(real).all()
    # normalised as the DiT sees them: clips of a dark background with a few objects, not noise
    assert 0.05 < float(real.std()) < 5 and float(real.std(dim=0).mean()) > 0
    assert isinstance(tr.fake, FakeScore)


@pytest.mark.parametrize("levels", [[], ["--gan-shift", "1"]], ids=["dmd-levels", "own-levels"])
def test_the_classifier_learns_real_clips_from_the_students_samples(tmp_path, levels):
    tr = gan_trainer(tmp_path, "--gan-d-weight", "1", "--fake-lr", "1e-3", *levels)
    own = tr._gan_draw(0, 0)[1]
    assert (own is None) == (not levels)  # by default the samples' logits come from the fake score's pass
    stats = [tr.fake_step(step=0, i=0)[1] for _ in range(12)]  # one fixed batch of each
    stats = [{k: float(v) for k, v in st.items()} for st in stats]
    assert stats[0]["d_real"] == pytest.approx(0.5) and stats[0]["d_fake"] == pytest.approx(0.5)  # starts undecided
    d = [s["gan_d"] for s in stats]
    assert all(b < a for a, b in zip(d, d[1:])) and d[-1] < 0.97 * d[0], d
    assert stats[-1]["d_real"] > 0.5 > stats[-1]["d_fake"]


def test_the_gan_term_pulls_the_student_towards_what_the_classifier_calls_real(tmp_path):
    tr = gan_trainer(tmp_path, "--gan", "100", "--gan-d-weight", "1", "--fake-lr", "1e-3", "--lr", "1e-4")
    for _ in range(12):
        tr.fake_step(step=0, i=0)
    step = 3
    loss, _, _, before = tr.student_loss(step)
    tr.opt_student.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None for p in tr.student.parameters() if p.requires_grad)
    tr.opt_student.step()
    with torch.no_grad():
        _, _, _, after = tr.student_loss(step)  # the same draw, the same classifier
    assert after["gan_g"] < before["gan_g"], (before["gan_g"], after["gan_g"])


def test_without_gan_the_fake_network_has_no_classifier(tmp_path):
    cfg = from_args(["--out", str(tmp_path), "--tiny"])
    tr = Trainer(cfg, Dist())
    assert tr.real is None and not isinstance(tr.fake, FakeScore)
    assert not any(k.startswith("classifier.") for k in tr.fake.state_dict())


def test_a_gan_run_resumes_exactly(tmp_path):
    keys, logged = stopped_and_resumed(tmp_path, "--gan", "0.01")
    assert any(".classifier." in k for k in keys)
    assert [r["step"] for r in logged] == [1, 2, 3] and all(0 < r["d_real"] < 1 for r in logged)


def test_a_checkpoint_from_before_the_gan_term_resumes_without_it(tmp_path):
    cfg = from_args(["--out", str(tmp_path), "--tiny", "--steps", "2"])
    Trainer(cfg, Dist()).run(say=lambda _msg: None)
    path = tmp_path / "ckpt" / "state.safetensors"
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    info = json.loads(meta["info"])
    del info["recipe"]["gan"]
    save_file(tensors, str(path), metadata=dict(meta, info=json.dumps(info)))
    said = []
    Trainer(from_args(["--out", str(tmp_path), "--tiny", "--steps", "3"]), Dist()).run(say=said.append)
    assert "from step 2/3" in said[0] and said[-1].startswith("done: 3 steps")
    with pytest.raises(SystemExit, match="gan.*fresh --out"):
        Trainer(from_args(["--out", str(tmp_path), "--tiny", "--steps", "4", "--gan", "0.01"]), Dist())


def test_gan_settings_it_cannot_serve_say_what_to_change(tmp_path):
    with pytest.raises(SystemExit, match="real USV World clips.*drop --embeddings"):
        from_args(["--out", str(tmp_path), "--gan", "0.01", "--embeddings", "prompts.safetensors"])
    with pytest.raises(SystemExit, match="drop --embeddings and --width"):
        from_args(["--out", str(tmp_path), "--gan", "0.01", "--size", "480", "--width", "832"])
    with pytest.raises(SystemExit, match="give --fake-updates 1 or more"):
        from_args(["--out", str(tmp_path), "--gan", "0.01", "--fake-updates", "0"])
    with pytest.raises(SystemExit, match="--gan, --gan-d-weight and --gan-shift must be >= 0"):
        from_args(["--out", str(tmp_path), "--gan", "-1"])
