"""One Wan video on 1 and 2 GPUs: seconds per denoising step, dense and with USV Sparse
Attention, with USV Sequence Parallel splitting the tokens over the GPUs; and the 2-GPU output
checked against the 1-GPU one. Writes bench/results/multigpu_<card>.json.

python3 bench/multigpu.py                 # Wan 14B architecture at 720p x 81 (75,600 tokens), 2 GPUs
python3 bench/multigpu.py --cpu-smoke     # the same code path, tiny model, 2 CPU processes over gloo

Starts one process per GPU itself (NCCL); under torchrun it uses the ranks it was given. Every
rank builds the same random-weight Wan through ComfyUI's own loader (bench/wan_model.py) and
runs ComfyUI's sampling path (CFGGuider, euler, cfg 1: one forward per step). The 1-GPU rows run
on rank 0 while the other ranks wait.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
    # name: (dim, ffn, layers, latent (C, T, H, W)); heads = dim // 128
    "14B-720p": (5120, 13824, 40, (16, 21, 90, 160)),
    "1.3B-480p": (1536, 8960, 30, (16, 21, 60, 104)),
    "tiny": (256, 512, 2, (16, 3, 16, 16)),
}


def build(size: str, device, dtype):
    from bench import wan_model

    wan_model.SIZES.setdefault(size, SIZES[size])
    return wan_model.build_model(size, device, dtype)


def sample(patcher, latent, cond, steps: int, repeats: int, device, dist):
    """(median seconds per step, the sampled latent of the last run)."""
    import torch
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds([[cond, {}]], [])
    guider.set_cfg(1.0)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps).to(device)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)).to(device)
    times, out = [], None
    for _ in range(repeats + 1):  # the first run loads the model and compiles kernels
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = guider.sample(noise, latent, sampler, sigmas, seed=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / steps)
        if not torch.isfinite(out).all():
            raise RuntimeError("non-finite output")
    return statistics.median(times[1:]), out.float().cpu()


def _rank(rank: int, world: int, args) -> None:
    import torch
    import torch.distributed as dist

    from bench.wan_model import boot_comfy

    nodes, device, dtype, card = boot_comfy(args.cpu_smoke)

    base = build(args.size, device, dtype)
    C, T, H, W = SIZES[args.size][3]
    latent = torch.zeros(1, C, T, H, W, device=device)
    cond = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    attn = nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    split = nodes.NODE_CLASS_MAPPINGS["USVSequenceParallel"]
    settings = {"dense": base, f"USV keep {args.keep:g}": attn.execute(base, args.keep, 0, "", "4x4x4").result[0]}

    rows, outputs = [], {}
    for name, patcher in settings.items():
        if rank == 0:  # one GPU: the model as it is, on rank 0 alone
            seconds, out = sample(patcher, latent, cond, args.steps, args.repeats, device, dist)
            rows.append({"setting": f"{name}, 1 GPU", "seconds": seconds, "speedup_vs_1gpu": 1.0})
            outputs[name] = out
            print(f"{name:>16}, 1 GPU : {seconds:8.3f} s/step", flush=True)
        dist.barrier()
    for name, patcher in settings.items():
        patcher = split.execute(patcher).result[0]
        seconds, out = sample(patcher, latent, cond, args.steps, args.repeats, device, dist)
        paths = patcher.model_options["transformer_options"]["usv_patch"].last_run.paths()
        if not paths.get(f"sequence-parallel:{world}"):
            raise RuntimeError(f"{name}: the model ran without being split over {world} ranks: {dict(paths)}")
        if rank == 0:
            one = next(r["seconds"] for r in rows if r["setting"] == f"{name}, 1 GPU")
            ref = outputs[name]
            err = float((out - ref).norm() / ref.norm().clamp_min(1e-12))
            rows.append({"setting": f"{name}, {world} GPUs", "seconds": seconds, "speedup_vs_1gpu": one / seconds,
                         "output_vs_1gpu": {"relative_l2": err, "max_abs": float((out - ref).abs().max())}})
            print(f"{name:>16}, {world} GPUs: {seconds:8.3f} s/step, {one / seconds:.2f}x, rel. L2 vs 1 GPU {err:.2e}",
                  flush=True)
    if rank != 0:
        return
    # bf16 keeps 8 bits of mantissa: two runs that round differently stay within a few 2^-8
    bf16 = 2.0 ** -8
    report = {"benchmark": "multigpu", "card": card, "gpus": world, "size": args.size,
              "tokens": T * (H // 2) * (W // 2), "dtype": str(dtype), "steps": args.steps, "repeats": args.repeats,
              "torch": torch.__version__, "rows": rows,
              "check": {"bf16_eps": bf16, "tolerance_relative_l2": 4 * bf16,
                        "within": all(r["output_vs_1gpu"]["relative_l2"] <= 4 * bf16
                                      for r in rows if "output_vs_1gpu" in r)},
              "date": time.strftime("%Y-%m-%d")}
    os.makedirs(args.out, exist_ok=True)
    suffix = "cpu_smoke" if args.cpu_smoke else card.replace(" ", "_").lower()
    path = os.path.join(args.out, f"multigpu_{suffix}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print("wrote", path, flush=True)


def _spawned(rank: int, world: int, args) -> None:
    _rank(rank, world, args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="14B-720p")
    p.add_argument("--gpus", type=int, default=2, help="processes to start (one GPU each) when not under torchrun")
    p.add_argument("--keep", type=float, default=0.125, help="USV Sparse Attention's keep for the USV rows")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, CPU processes over gloo: checks the code path")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.size, args.steps, args.repeats = "tiny", 2, 1
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch
    import torch.distributed as dist

    if "RANK" in os.environ:  # torchrun gave us our rank
        cuda = torch.cuda.is_available() and not args.cpu_smoke
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            _rank(dist.get_rank(), dist.get_world_size(), args)
        finally:
            dist.destroy_process_group()
        return 0
    from usv_core.parallel import spawn

    cuda = torch.cuda.is_available() and not args.cpu_smoke
    if cuda and torch.cuda.device_count() < args.gpus:
        raise SystemExit(f"--gpus {args.gpus} but this machine has {torch.cuda.device_count()} GPU(s)")
    spawn(_spawned, args.gpus, args, backend="nccl" if cuda else "gloo", timeout_s=3600)
    return 0


if __name__ == "__main__":
    sys.exit(main())
