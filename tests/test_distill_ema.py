"""--ema in python3 -m usv_core.distill: a moving average of the student's weights, exported in
place of its last weights, kept in the checkpoint so that a run resumes exactly."""

import pytest
import torch
from safetensors.torch import load_file

from test_distill import one_thread  # noqa: F401  (autouse: one thread on two shared cores)
from test_distill_resume import stopped_and_resumed
from usv_core.distill.config import from_args
from usv_core.distill.dist import Dist
from usv_core.distill.loop import STUDENT_FILE, Trainer


def run(out, *extra):
    cfg = from_args(["--out", str(out), "--tiny", "--keep", "0.25", "--merge", "0", "--lr", "1e-3", *extra])
    trainer = Trainer(cfg, Dist())
    trainer.run(say=lambda _msg: None)
    return trainer


def test_the_exported_student_is_the_average_of_its_weights(tmp_path):
    start = {k: v.clone() for k, v in Trainer(from_args(["--out", str(tmp_path / "init"), "--tiny"]), Dist())
             .student.state_dict().items()}
    tr = run(tmp_path / "one", "--steps", "1", "--ema", "0.99")
    last = tr.student.state_dict()
    exported = load_file(str(tmp_path / "one" / STUDENT_FILE))
    # after the first step the ramped decay is 1/10: 0.1 of the start, 0.9 of the trained weights
    moved = [k for k in last if not torch.equal(last[k], start[k])]
    assert moved
    for k in moved:
        want = 0.1 * start[k] + 0.9 * last[k]
        assert torch.allclose(exported[k].float(), want, rtol=1e-2, atol=1e-3), k
        assert not torch.allclose(exported[k].float(), last[k], rtol=1e-3, atol=1e-5), k
    assert exported.keys() == last.keys()


def test_an_averaged_run_resumes_exactly(tmp_path):
    keys, _ = stopped_and_resumed(tmp_path, "--keep", "0.25", "--merge", "0", "--lr", "1e-3", "--ema", "0.9")
    assert any(k.startswith("module.student_ema.") for k in keys)


def test_a_run_resumes_only_with_the_averaging_it_started_with(tmp_path):
    run(tmp_path, "--steps", "1")
    with pytest.raises(SystemExit, match=r"other settings \(ema\)"):
        run(tmp_path, "--steps", "2", "--ema", "0.99")
    run(tmp_path / "avg", "--steps", "1", "--ema", "0.99")
    with pytest.raises(SystemExit, match=r"other settings \(ema\)"):
        run(tmp_path / "avg", "--steps", "2")
    with pytest.raises(SystemExit, match="--ema is a decay in"):
        from_args(["--out", str(tmp_path), "--ema", "1"])
