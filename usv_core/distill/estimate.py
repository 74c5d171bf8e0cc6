"""What a distillation step costs, measured where it can be (here: the CPU) and scaled to a larger
model by what does not depend on the machine.

A DMD2 step is a fixed mix of forward and backward passes of networks of one size (the student's
backward simulation, the fake-score updates, the teacher's CFG pair). Its time over the time of
one dense forward of the same network at the same size is therefore a count of
forward-equivalents that carries over to another model and machine; multiplied by a measured
forward time there (bench/results/wan_model_*.json: Wan 2.1 1.3B at 480p x 81 on an H200) it
estimates the step there. What does not carry over is said in the output: the sparse student is
measured dense here (the CPU reference is no faster when sparse), so the estimate is an upper
bound on the student's share.

    python3 -m usv_core.distill.estimate [--dim 256 --layers 8 --frames 17 --size 128]"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch
from safetensors.torch import save_file

from .config import from_args
from .dist import Dist
from .export import save_full
from .loop import Trainer
from .models import tiny_teacher
from ..world.dit import WanDiT

WAN13B = {"dim": 1536, "ffn_dim": 8960, "layers": 30, "tokens": 32760, "text_tokens": 512}


def params_of(dim: int, ffn: int, layers: int) -> int:
    return sum(p.numel() for p in WanDiT(dim, ffn, 1).blocks[0].parameters()) * layers


def measure(dim: int, ffn: int, layers: int, frames: int, size: int, fake_updates: int, steps: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        teacher = tiny_teacher(0, layers) if dim == 128 and ffn == 256 else WanDiT(dim, ffn, layers)
        with torch.no_grad():
            for p in teacher.parameters():
                p.normal_(0, 0.02)
        save_full(teacher.state_dict(), os.path.join(tmp, "teacher.safetensors"), dtype=torch.float32)
        save_file({"cond": torch.randn(4, 16, 4096), "uncond": torch.zeros(1, 16, 4096)}, os.path.join(tmp, "emb.safetensors"))
        cfg = from_args(["--out", tmp, "--teacher", os.path.join(tmp, "teacher.safetensors"), "--embeddings",
                         os.path.join(tmp, "emb.safetensors"), "--batch", "1", "--frames", str(frames), "--size", str(size),
                         "--fake-updates", str(fake_updates), "--dense-student", "--steps", str(steps)])
        tr = Trainer(cfg, Dist())
        x = torch.randn(1, *cfg.latent_shape())
        c = torch.randn(1, 16, 4096)
        t = torch.tensor([500.0])
        with torch.no_grad():
            tr.teacher(x, t, c)  # warm-up
            t0 = time.perf_counter()
            for _ in range(3):
                tr.teacher(x, t, c)
            forward = (time.perf_counter() - t0) / 3
        tr.train_step()  # warm-up
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            tr.train_step()
            times.append(time.perf_counter() - t0)
        step = sum(times) / len(times)
        saved = saved_per_token_layer(tr.fake, x, t, c, ffn)
    return {"dim": dim, "ffn_dim": ffn, "layers": layers, "latent": list(cfg.latent_shape()), "fake_updates": fake_updates,
            "threads": torch.get_num_threads(), "forward_seconds": forward, "step_seconds": step,
            "saved_floats_per_token_layer": saved,
            "forward_equivalents": step / forward, "forward_equivalents_counted": counted(3, fake_updates)}


def saved_per_token_layer(model, x, t, c, ffn: int) -> dict:
    """Floats autograd keeps for backward per token and block, split into those of width ffn
    (feed-forward hidden) and the rest (width dim, attention heads), measured on one forward."""
    counts = {"ffn": 0, "other": 0}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # saved weights are not activations

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            counts["ffn" if tensor.dim() and tensor.shape[-1] == ffn else "other"] += tensor.numel()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t_: t_):
        model(x, t, c).sum()
    tokens = x.shape[2] * (x.shape[3] // 2) * (x.shape[4] // 2)
    n = len(model.blocks)
    return {k: v / tokens / n for k, v in counts.items()}


def counted(schedule_steps: int, fake_updates: int) -> float:
    """Forward-equivalents of one step by counting passes (a backward taken as two forwards): each
    fake update draws a student sample (on average (n + 1) / 2 student forwards for a schedule of
    n steps) and trains the fake (forward + backward); the student update runs its backward
    simulation ((n - 1) / 2), its trained forward and backward, the teacher's CFG pair and the fake."""
    n = schedule_steps
    return fake_updates * ((n + 1) / 2 + 3) + ((n - 1) / 2 + 3 + 2 + 1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--fake-updates", type=int, default=5)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores make timings meaningless)")
    p.add_argument("--gpu-forward-seconds", type=float, default=0.549,
                   help="one dense Wan 1.3B forward at 480p x 81, batch 1 (H200, bench/results/wan_model_1.3B-480p_NVIDIA_H200.json)")
    p.add_argument("--student-steps", type=int, default=4000, help="student updates of the Wan run to estimate")
    p.add_argument("--gpus", type=int, default=8)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    m = measure(a.dim, a.ffn_dim, a.layers, a.frames, a.size, a.fake_updates, a.steps)
    step_gpu = m["forward_equivalents"] * a.gpu_forward_seconds  # batch 1 per GPU, one step for all GPUs together
    n = params_of(WAN13B["dim"], WAN13B["ffn_dim"], WAN13B["layers"])
    per = m["saved_floats_per_token_layer"]
    # saved widths scale with the model's: "other" in units of dim, "ffn" in units of ffn_dim
    floats = (per["other"] / a.dim * WAN13B["dim"] + per["ffn"] / a.ffn_dim * WAN13B["ffn_dim"]) * WAN13B["tokens"]
    activations_gb = floats * 2 * WAN13B["layers"] / 1e9  # bf16 under autocast
    m["wan_1.3b"] = {
        "params_in_blocks": n,
        "step_seconds_per_gpu_batch1": step_gpu,
        "student_steps": a.student_steps, "gpus": a.gpus, "global_batch": a.gpus,
        "hours": step_gpu * a.student_steps / 3600,
        # fp32 weights, grads and two Adam moments for student and fake (16 B/param each), bf16 teacher
        "state_gb_total": (2 * 16 + 2) * n / 1e9,
        "state_gb_per_gpu_fsdp": (2 * 16 + 2) * n / 1e9 / a.gpus,
        "activations_gb_dense_backward": activations_gb,
        "activations_gb_checkpointed": activations_gb / WAN13B["layers"] + WAN13B["tokens"] * WAN13B["dim"] * 4 * WAN13B["layers"] / 1e9,
        "note": "estimate: CPU-measured forward-equivalents per step x the H200's measured dense forward; "
                "student measured dense (an upper bound for a sparse student); activations from saved tensors per token and block at small size, scaled by width and tokens",
    }
    print(json.dumps(m, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
