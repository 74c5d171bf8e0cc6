"""Resuming python3 -m usv_core.distill: a run stopped (or killed) and started again with the same
command ends in exactly the state of a run that was never interrupted, logs every step once, and
a checkpoint written with other settings is refused with what to do."""

import json
import os
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from usv_core.distill.config import from_args
from usv_core.distill.dist import Dist
from test_distill import one_thread  # noqa: F401  (autouse: one thread on two shared cores)
from usv_core.distill.loop import LOG_FILE, STUDENT_FILE, Trainer


def run(out, *extra):
    cfg = from_args(["--out", str(out), "--tiny", "--steps", "4", "--save-every", "2", "--keep", "0.25", *extra])
    return Trainer(cfg, Dist()).run(say=lambda _msg: None)


def stopped_and_resumed(tmp_path, *options):
    """Three steps of a run with these options, once whole and once stopped at step 2 and resumed;
    asserts both end in the same checkpoint, bit for bit -> (its keys, the resumed run's log)."""
    def run_3(out, *extra):
        cfg = from_args(["--out", str(out), "--tiny", "--steps", "3", "--save-every", "1", *options, *extra])
        Trainer(cfg, Dist()).run(say=lambda _msg: None)

    run_3(tmp_path / "whole")
    run_3(tmp_path / "split", "--stop-at-step", "2")
    run_3(tmp_path / "split")
    with safe_open(str(tmp_path / "whole" / "ckpt" / "state.safetensors"), "pt") as a, \
            safe_open(str(tmp_path / "split" / "ckpt" / "state.safetensors"), "pt") as b:
        keys = set(a.keys())
        assert keys == set(b.keys())
        for k in keys:
            assert torch.equal(a.get_tensor(k), b.get_tensor(k)), k
    with open(tmp_path / "split" / LOG_FILE) as f:
        return keys, [json.loads(line) for line in f]


def steps_logged(out):
    with open(os.path.join(out, LOG_FILE)) as f:
        return [json.loads(line)["step"] for line in f]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    run(whole)
    first = run(split, "--stop-at-step", "3")
    assert first["stopped"] and first["step"] == 3
    with safe_open(str(split / STUDENT_FILE), "pt") as f:  # the student so far, exported at the stop
        assert json.loads(f.metadata()["usv_distill"])["steps_trained"] == 3
    # a run killed after logging step 4 but before its next checkpoint: that step is trained again
    with open(split / LOG_FILE, "a") as f:
        f.write(json.dumps({"step": 4, "dmd": 0.0}) + "\n")
    run(split)
    assert steps_logged(split) == [1, 2, 3, 4]
    a, b = load_file(whole / "ckpt" / "state.safetensors"), load_file(split / "ckpt" / "state.safetensors")
    assert a.keys() == b.keys() and any(k.startswith("opt.fake.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(load_file(whole / STUDENT_FILE)["head.head.weight"], load_file(split / STUDENT_FILE)["head.head.weight"])
    assert not [p for p in os.listdir(split / "ckpt") if p.endswith(".tmp")]


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    run(tmp_path, "--stop-at-step", "1")
    with pytest.raises(SystemExit, match="keep.*fresh --out"):
        run(tmp_path, "--keep", "0.5")


def test_sigterm_saves_and_stops_after_the_step(tmp_path):
    import signal

    cfg = from_args(["--out", str(tmp_path), "--tiny", "--steps", "4", "--save-every", "100"])
    tr = Trainer(cfg, Dist())
    step = tr.train_step

    def step_then_terminate():
        out = step()
        os.kill(os.getpid(), signal.SIGTERM)  # what a time limit sends
        return out

    tr.train_step = step_then_terminate
    result = tr.run(say=lambda _msg: None)
    assert result["stopped"] == "SIGTERM" and result["step"] == 1
    assert Trainer(cfg, Dist()).step == 1  # the state was saved before stopping


def test_stop_after_counts_the_commands_setup(tmp_path):
    # a command sized to a time limit must end inside it, however long loading and its one-off
    # work (real clips, teacher pairs) took: that time counts
    cfg = from_args(["--out", str(tmp_path), "--tiny", "--steps", "4", "--stop-after", "0.5"])
    trainer = Trainer(cfg, Dist())
    time.sleep(0.6)
    said = []
    result = trainer.run(say=said.append)
    assert result["step"] == 0 and result["stopped"] == "--stop-after 0.5s"
    assert "run the same command to resume" in said[-1]
