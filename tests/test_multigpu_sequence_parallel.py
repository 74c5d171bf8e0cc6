"""One Wan video over two ComfyUI processes: scripts/sequence_parallel.py under torchrun (gloo on
the CPU) runs a workflow with USV Sequence Parallel on both ranks, and rank 0's sampled latent
equals what one process samples, over a dense step and a USV Sparse Attention step. In one
process (no process group) the node changes nothing."""

import glob
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from harness import runtime, test_nodes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompt(unet, conds, latent):
    pos, neg = conds
    g = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "pos": {"class_type": "USVTestConditioning", "inputs": {"name": pos}},
        "neg": {"class_type": "USVTestConditioning", "inputs": {"name": neg}},
        "latent": {"class_type": "USVTestLatent", "inputs": {"name": latent}},
        "usv": {"class_type": "USVSparseAttention", "inputs": {"model": ["unet", 0], "keep": 0.25, "dense_steps": 1,
                                                               "dense_blocks": "", "cube": "4x4x4"}},
        "sp": {"class_type": "USVSequenceParallel", "inputs": {"model": ["usv", 0]}},
        # step 0 is dense (dense_steps 1), step 1 sparse: both attention paths run split
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["sp", 0], "seed": 7, "steps": 2, "cfg": 4.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "usv_sp"}},
        "report": {"class_type": "USVReport", "inputs": {"model": ["sp", 0], "latent": ["sample", 0]}},
    }
    return g


def test_two_ranks_sample_what_one_process_samples(comfy, tiny_wan, conds, run_workflow, tmp_path):
    latent = test_nodes.put_tensor(torch.zeros(1, 16, 3, 16, 16))
    g = prompt(tiny_wan, conds, latent)
    want = run_workflow(g, outputs=("sample",)).output("sample")["samples"]
    dense = dict(g, usv=dict(g["usv"], inputs=dict(g["usv"]["inputs"], keep=1.0)))
    assert not torch.allclose(run_workflow(dense, outputs=("sample",)).output("sample")["samples"], want,
                              atol=1e-3), "keep 0.25 changed nothing"

    wf = tmp_path / "workflow.json"
    wf.write_text(__import__("json").dumps(g))
    env = dict(os.environ, COMFYUI_DIR=runtime.comfyui_dir(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", os.path.join(ROOT, "scripts", "sequence_parallel.py"), str(wf),
           "--cpu", "--base-directory", runtime.base_dir(), "--output-directory", str(tmp_path / "out")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    found = glob.glob(str(tmp_path / "out" / "usv_sp_*.latent"))
    assert len(found) == 1, (found, done.stdout[-2000:])
    # every linear runs on half the tokens, attention per head on all: equal to float rounding
    torch.testing.assert_close(load_file(found[0])["latent_tensor"], want, rtol=1e-4, atol=1e-4)
    assert '"world_size": 2' in done.stdout
    # the split really happened: each rank ran every block on its half (else both ranks would
    # compute the whole video, and agree just as well)
    assert "sequence parallel: 2 ranks" in done.stdout, done.stdout[-2000:]


def test_without_a_process_group_the_node_changes_nothing(comfy, tiny_wan, conds, run_workflow):
    latent = test_nodes.put_tensor(torch.zeros(1, 16, 3, 16, 16))
    g = prompt(tiny_wan, conds, latent)
    g["plain"] = dict(g["sample"], inputs=dict(g["sample"]["inputs"], model=["usv", 0]))
    del g["save"], g["report"]
    r = run_workflow(g, outputs=("sample", "plain"))
    assert torch.equal(r.output("sample")["samples"], r.output("plain")["samples"])


def test_refuses_models_other_than_wan(comfy):
    from harness import tiny_models

    node = comfy.NODE_CLASS_MAPPINGS["USVSequenceParallel"]
    with pytest.raises(ValueError, match="supports Wan 2.1 / 2.2 models; this is LTX"):
        node.execute(tiny_models.tiny_ltxv())
