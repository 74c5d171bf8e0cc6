"""The torch.distributed path of python3 -m usv_core.distill: two processes on the CPU (gloo) with
the networks sharded by FSDP2 train, save one checkpoint of full tensors and export the student
gathered from the shards; that checkpoint resumes in a single process (a run moved to another
number of GPUs)."""

import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from usv_core.distill.config import from_args
from usv_core.distill.dist import Dist
from usv_core.distill.loop import Trainer
from usv_core.distill.models import tiny_teacher

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["-m", "usv_core.distill", "--tiny", "--keep", "0.25", "--merge", "0.5", "--log-every", "1", "--fake-updates", "1"]


def launch(out, nproc, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    p = subprocess.run(cmd + ARGS + ["--out", str(out), *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def test_two_gloo_processes_with_fsdp2_train_export_and_resume_on_one(tmp_path):
    out = launch(tmp_path, 2, "--steps", "2")
    assert "2 process(es) on cpu" in out and "step 2/2" in out and "done: 2 steps" in out
    assert out.count("step 1/2") == 1  # only rank 0 speaks
    state = load_file(tmp_path / "ckpt" / "state.safetensors")
    teacher = tiny_teacher(0).state_dict()
    q = "blocks.0.self_attn.q.weight"
    # full (gathered) tensors, not one rank's shards, and the student has moved off the teacher
    assert state["module.student." + q].shape == teacher[q].shape
    assert not torch.equal(state["module.student." + q], teacher[q])
    assert state[f"opt.student.{q}.exp_avg_sq"].shape == teacher[q].shape
    exported = load_file(tmp_path / "student_dit.safetensors")  # gathered from the shards for export
    assert exported.keys() == teacher.keys() and exported[q].dtype == torch.bfloat16
    assert torch.equal(exported[q], state["module.student." + q].to(torch.bfloat16))

    said = []
    cfg = from_args(ARGS[2:] + ["--out", str(tmp_path), "--steps", "3"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(cfg, Dist()).run(say=said.append)
    finally:
        torch.set_num_threads(threads)
    assert "from step 2/3" in said[0] and said[-1].startswith("done: 3 steps")
    with open(tmp_path / "log.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]


def test_two_processes_train_the_gan_classifier_in_the_fake_networks_shards(tmp_path):
    out = launch(tmp_path, 2, "--steps", "1", "--gan", "0.01")
    assert "real clips encoded" in out and "done: 1 steps" in out
    state = load_file(tmp_path / "ckpt" / "state.safetensors")
    w = state["module.fake.classifier.mlp.2.weight"]  # zero at the start: it moved, and whole
    assert w.shape == (1, 128) and w.abs().sum() > 0
    assert "opt.fake.classifier.mlp.2.weight.exp_avg" in state


def test_two_processes_average_the_students_shards_and_export_the_average(tmp_path):
    launch(tmp_path, 2, "--steps", "1", "--ema", "0.99")
    state = load_file(tmp_path / "ckpt" / "state.safetensors")
    teacher = tiny_teacher(0).state_dict()
    q = "blocks.0.self_attn.q.weight"
    ema, last = state["module.student_ema." + q], state["module.student." + q]
    assert ema.shape == teacher[q].shape  # gathered whole
    assert torch.allclose(ema, 0.1 * teacher[q] + 0.9 * last, atol=1e-6)  # each shard averaged with its own
    exported = load_file(tmp_path / "student_dit.safetensors")
    assert torch.equal(exported[q], ema.to(torch.bfloat16))


def test_two_processes_sample_the_regression_pairs_through_the_sharded_teacher(tmp_path):
    out = launch(tmp_path, 2, "--steps", "1", "--regress", "1")
    assert "teacher pairs ready" in out and "done: 1 steps" in out
    with open(tmp_path / "log.jsonl") as f:
        logged = [json.loads(line) for line in f]
    assert len(logged) == 1 and logged[0]["regress"] > 0
    # each process drew its own pairs and keeps them in its own file
    own = [load_file(tmp_path / "ckpt" / f"pairs_rank{r}.safetensors")["states"] for r in (0, 1)]
    assert own[0].shape == own[1].shape and not torch.equal(own[0], own[1])
