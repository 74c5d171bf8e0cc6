"""Seconds per denoising step of a Wan 2.1 model built through ComfyUI (random weights), dense
and with USV nodes, in one run. Writes bench/results/wan_model_<card>.json.

python3 bench/wan_model.py                      # Wan2.1-1.3B architecture at 480p x 81 frames
python3 bench/wan_model.py --size tiny --cpu    # a seconds-long smoke run of the script itself

Runs the real sampling path (CFGGuider, euler, cfg 1: one forward per step) so that every
wrapper, override and block hook USV installs is on the clock.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SIZES = {
    # name: (dim, ffn, layers, latent (C, T, H, W))
    "1.3B-480p": (1536, 8960, 30, (16, 21, 60, 104)),
    "tiny": (256, 512, 2, (16, 3, 16, 16)),
}


def av_stand_in() -> None:
    """ComfyUI's API module imports PyAV for video I/O, which this benchmark never does; the GPU
    machine may lack the 35 MB wheel."""
    try:
        import av  # noqa: F401
        return
    except ImportError:
        pass

    class _Any:
        def __init__(self, *a, **k):
            pass

    def module(name):
        m = types.ModuleType(name)
        m.__getattr__ = lambda attr: _Any if not attr.startswith("__") else (_ for _ in ()).throw(AttributeError(attr))
        m.__path__ = []
        sys.modules[name] = m
        return m

    for name in ("av", "av.container", "av.subtitles", "av.subtitles.stream", "av.video", "av.video.frame",
                 "av.audio", "av.audio.frame"):
        module(name)


def boot_comfy(cpu: bool):
    """(nodes, device, dtype, card): ComfyUI booted quietly with the pack, on the current CUDA
    device in bf16, or on the CPU in float32 when asked or when there is no GPU."""
    import logging

    import torch

    from harness import runtime

    av_stand_in()
    logging.disable(logging.WARNING)
    nodes = runtime.boot()
    logging.disable(logging.NOTSET)
    if cpu or not torch.cuda.is_available():
        return nodes, torch.device("cpu"), torch.float32, platform.processor() or "cpu"
    device = torch.device("cuda", torch.cuda.current_device())
    return nodes, device, torch.bfloat16, torch.cuda.get_device_name(device)


def build_model(size: str, device, dtype):
    """Random weights in the checkpoint layout, loaded through ComfyUI's own loader, so that the
    model runs with the operations and dtypes a user's Wan would."""
    import torch
    import comfy.ops
    import comfy.sd
    from comfy.ldm.wan.model import WanModel

    dim, ffn, layers, _ = SIZES[size]
    with torch.device("meta"):
        shapes = WanModel(dim=dim, ffn_dim=ffn, num_heads=dim // 128, num_layers=layers, in_dim=16, out_dim=16,
                          operations=comfy.ops.disable_weight_init).state_dict()
    gen = torch.Generator(device=device).manual_seed(0)
    sd = {}
    for name, p in shapes.items():
        if p.ndim >= 2:
            t = torch.randn(p.shape, generator=gen, device=device) / p[0].numel() ** 0.5
        elif "norm" in name:
            t = torch.ones(p.shape, device=device)
        else:
            t = 0.02 * torch.randn(p.shape, generator=gen, device=device)
        sd[name] = t.to(dtype)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    # Wan embeds patches from a float32 latent (`x.float()`); let that one conv cast its weights.
    patcher.model.diffusion_model.patch_embedding.comfy_cast_weights = True
    return patcher


def time_steps(patcher, latent, cond, steps: int, repeats: int, device) -> list[float]:
    import torch
    import comfy.sample
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds([[cond, {}]], [])
    guider.set_cfg(1.0)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps).to(device)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1)).to(device)
    out = []
    for _ in range(repeats + 1):  # the first run compiles kernels and loads the model
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        res = guider.sample(noise, latent, sampler, sigmas, seed=1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) / steps)
        if not torch.isfinite(res).all():
            raise RuntimeError("non-finite output")
    return out[1:]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=list(SIZES), default="1.3B-480p")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--variants", default="dense,keep0.125,keep0.05",
                   help="comma-separated: dense, keep<r>, merge<r>, keep<r>+merge<r>, speed<s> (USV Accelerate)")
    p.add_argument("--kv", choices=("table", "rows", "tma"), default=None,
                   help="where sparse attention's forward reads key tiles (usv_core.attention.ops.set_kernel_config; "
                        "default: the pack's)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    args = p.parse_args(argv)

    import torch

    nodes, device, dtype, card = boot_comfy(args.cpu)
    from harness import runtime

    ops = runtime.pack_module("usv_core.attention.ops")  # the ops the nodes call
    if args.kv:
        ops.set_kernel_config(kv=args.kv)
    kv = ops.kv_source(device)

    base = build_model(args.size, device, dtype)
    C, T, H, W = SIZES[args.size][3]
    latent = torch.zeros(1, C, T, H, W, device=device)
    cond = torch.randn(1, 512, 4096, generator=torch.Generator().manual_seed(2)).to(device, dtype)
    attn = nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    merge = nodes.NODE_CLASS_MAPPINGS.get("USVTokenMerge")
    accelerate = nodes.NODE_CLASS_MAPPINGS.get("USVAccelerate")

    results = []
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        patcher = base
        for part in variant.split("+"):
            if part.startswith("keep"):
                patcher = attn.execute(patcher, float(part[4:]), 0, "", "4x4x4").result[0]
            elif part.startswith("merge"):
                if merge is None:
                    raise SystemExit("USVTokenMerge is not in this checkout")
                patcher = merge.execute(patcher, float(part[5:]), 0, "", "keys").result[0]
            elif part.startswith("speed"):
                if accelerate is None:
                    raise SystemExit("USVAccelerate is not in this checkout")
                patcher = accelerate.execute(patcher, int(part[5:])).result[0]
            elif part != "dense":
                raise SystemExit(f"unknown variant part {part!r}")
        times = time_steps(patcher, latent, cond, args.steps, args.repeats, device)
        row = {"variant": variant, "seconds_per_step": statistics.median(times), "all": times}
        results.append(row)
        print(f"{args.size:>10} {variant:>22}: {row['seconds_per_step'] * 1000:9.1f} ms/step", flush=True)
    dense = next((r["seconds_per_step"] for r in results if r["variant"] == "dense"), None)
    if dense:
        for r in results:
            r["vs_dense"] = r["seconds_per_step"] / dense
            if "speed" in r["variant"]:
                # USV Accelerate runs the first dense_steps of this schedule dense (none for a few-step
                # schedule): the rest are the accelerated ones
                n = runtime.pack_module("nodes.accelerate").dense_steps(args.steps)
                if n < args.steps:
                    acc = (args.steps * r["seconds_per_step"] - n * dense) / (args.steps - n)
                    r.update(dense_steps=n, accelerated_seconds_per_step=acc, accelerated_vs_dense=acc / dense)
    report = {"benchmark": "wan_model", "card": card, "size": args.size, "tokens": T * (H // 2) * (W // 2),
              "dtype": str(dtype), "steps": args.steps, "kv": kv, "torch": torch.__version__, "results": results,
              "date": time.strftime("%Y-%m-%d")}
    os.makedirs(args.out, exist_ok=True)
    name = f"wan_model_{args.size}_{card.replace(' ', '_')}{'_kv_' + args.kv if args.kv else ''}.json"
    with open(os.path.join(args.out, name), "w") as f:
        json.dump(report, f, indent=2)
    print("wrote", os.path.join(args.out, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
