"""Seconds per student step of the distillation recipe (issue 14) and where they go: one process on
one GPU, each variant's steps timed after warm-up, then a few under torch.profiler: the GPU's busy
time against the wall clock, kernel launches, and the calls that make the host wait for the GPU.
Writes bench/results/distill_step_<card>.json (--json to change).

    python3 bench/distill_step.py                                   # keep 0.2; with the GAN term; compiled
    python3 bench/distill_step.py --variants "b8=--keep 0.2 --merge 0 --batch 8"
    python3 bench/distill_step.py --root OLD_CHECKOUT --tag before  # the same on another tree's usv_core
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "keep0.2": "--keep 0.2 --merge 0 --lr 1e-4 --fake-lr 1e-4 --fake-updates 4",
    "keep0.2+gan": "--keep 0.2 --merge 0 --lr 1e-4 --fake-lr 1e-4 --fake-updates 4 --gan 3e-3 --gan-clips 64",
    "keep0.2+compile": "--keep 0.2 --merge 0 --lr 1e-4 --fake-lr 1e-4 --fake-updates 4 --compile",
}
LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx", "cudaLaunchKernelExC")
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def profile_steps(trainer, n: int) -> dict:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            trainer.train_step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    avgs = prof.key_averages()
    # kernels only: an op's row carries its kernels' time too, so summing every row counts it twice
    gpu_us = sum(a.self_device_time_total for a in avgs if a.device_type == DeviceType.CUDA)
    count = lambda names: sum(a.count for a in avgs if a.key in names) / n  # noqa: E731
    top = lambda key, rows: [{"op": a.key[:80], "count": a.count // n, "ms_per_step": getattr(a, key) / 1e3 / n}  # noqa: E731
                             for a in sorted(rows, key=lambda a: -getattr(a, key))[:15]]
    kernels = [a for a in avgs if a.device_type == DeviceType.CUDA]
    return {"profiled_step_s": wall, "gpu_busy_s": gpu_us / 1e6 / n, "gpu_busy_share": gpu_us / 1e6 / n / wall,
            "launches_per_step": count(LAUNCHES), "host_waits_per_step": count(WAITS),
            "top_host_ops": top("self_cpu_time_total", avgs), "top_kernels": top("self_device_time_total", kernels)}


def run_variant(name: str, args: str, warm: int, timed: int, profiled: int) -> dict:
    import torch
    from usv_core.distill.config import from_args
    from usv_core.distill.dist import init
    from usv_core.distill.loop import Trainer

    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        trainer = Trainer(from_args(["--out", out, *shlex.split(args)]), init())
        setup = time.perf_counter() - t0
        t0 = time.perf_counter()
        trainer.train_step()  # where a compiled variant compiles
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        for _ in range(warm - 1):
            trainer.train_step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(timed):
            trainer.train_step()
        torch.cuda.synchronize()
        step = (time.perf_counter() - t0) / timed
        row = {"variant": name, "args": args, "setup_s": setup, "first_step_s": first, "step_s": step, "timed_steps": timed,
               **profile_steps(trainer, profiled), "peak_gb": torch.cuda.max_memory_allocated() / 2**30}
        del trainer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    print(f"{name}: {row['step_s']:.3f} s/step; GPU busy {row['gpu_busy_s']:.3f} s ({100 * row['gpu_busy_share']:.0f}%), "
          f"{row['launches_per_step']:.0f} launches, {row['host_waits_per_step']:.0f} host waits a step", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default="", help='"name=distill options;name=..." (default: ' + ", ".join(VARIANTS) + ")")
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--timed", type=int, default=10)
    ap.add_argument("--profiled", type=int, default=3)
    ap.add_argument("--root", default=ROOT, help="tree whose usv_core is timed (default: this one)")
    ap.add_argument("--tag", default="", help="suffix of the JSON name")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.root))
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: this benchmark times GPU steps (the recipe's CPU path is tested in tests/)")
    torch.backends.cuda.matmul.allow_tf32 = True  # as usv_core.distill's main sets it
    variants = dict(VARIANTS)
    if a.variants:
        variants = dict(v.split("=", 1) for v in a.variants.split(";") if v.strip())
    card = torch.cuda.get_device_name()
    rows = [run_variant(n, v, a.warm, a.timed, a.profiled) for n, v in variants.items()]
    path = a.json or os.path.join(ROOT, "bench", "results",
                                  f"distill_step_{card.replace(' ', '_')}{'_' + a.tag if a.tag else ''}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"card": card, "torch": torch.__version__, "root": "this tree" if a.root == ROOT else a.tag or "other",
                   "rows": rows}, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
