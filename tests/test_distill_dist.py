"""The torch.distributed path of python3 -m usv_core.distill: two processes on the CPU (gloo) with
the networks sharded by FSDP2 train, save one checkpoint of full tensors, and that checkpoint
resumes in a single process (a run moved to another number of GPUs) and exports the student."""

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


def test_two_gloo_processes_with_fsdp2_train_and_resume_on_one(tmp_path):
    out = launch(tmp_path, 2, "--steps", "3", "--stop-at-step", "2")
    assert "2 process(es) on cpu" in out and "step 2/3" in out and "stopped at step 2" in out
    assert out.count("step 1/3") == 1  # only rank 0 speaks
    state = load_file(tmp_path / "ckpt" / "state.safetensors")
    teacher = tiny_teacher(0).state_dict()
    # full (gathered) tensors, not one rank's shards, and the student has moved off the teacher
    assert state["module.student.blocks.0.self_attn.q.weight"].shape == teacher["blocks.0.self_attn.q.weight"].shape
    assert not torch.equal(state["module.student.blocks.0.self_attn.q.weight"], teacher["blocks.0.self_attn.q.weight"])
    assert state["opt.student.blocks.0.self_attn.q.weight.exp_avg_sq"].shape == teacher["blocks.0.self_attn.q.weight"].shape

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
    student = load_file(tmp_path / "student_dit.safetensors")
    assert student.keys() == teacher.keys() and student["head.modulation"].dtype == torch.bfloat16
