"""Seconds per USV World video on this machine's CPU, through ComfyUI's own executor: UNETLoader,
VAELoader, USVWorldPrompt (positive and empty negative), EmptyHunyuanLatentVideo 256x256x33,
KSampler euler/simple with CFG, then the decode twice: ComfyUI's VAEDecode and USV VAE Decode
(the whole clip at once on the CPU). Also scores the video. Writes bench/results/world_cpu.json.

    .venv/bin/python bench/world_cpu.py [--steps 50] [--cfg 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--prompt", default="a red circle and a blue square")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "world_cpu.json"))
    a = p.parse_args()

    import torch
    from harness import runtime

    runtime.boot()
    import nodes

    from usv_core.world import score_details

    # The graph's nodes called one by one (the classes the executor calls), to time each stage.
    t0 = time.perf_counter()
    model = nodes.UNETLoader().load_unet("usv_world_dit.safetensors", "default")[0]
    vae = nodes.VAELoader().load_vae("usv_world_vae.safetensors")[0]
    prompt_node = nodes.NODE_CLASS_MAPPINGS["USVWorldPrompt"]
    pos, neg = prompt_node.execute(a.prompt).result[0], prompt_node.execute("").result[0]
    latent = {"samples": torch.zeros(1, 16, 9, 32, 32)}
    t1, c1 = time.perf_counter(), time.process_time()
    samples = nodes.KSampler().sample(model, 0, a.steps, a.cfg, "euler", "simple", pos, neg, latent, denoise=1.0)[0]
    t2, c2 = time.perf_counter(), time.process_time()
    frames = vae.decode(samples["samples"])
    frames = frames.reshape(-1, *frames.shape[-3:])
    t3, c3 = time.perf_counter(), time.process_time()
    usv_frames = nodes.NODE_CLASS_MAPPINGS["USVVAEDecode"].execute(samples, vae).result[0]
    t4 = time.perf_counter()
    s = score_details(frames, a.prompt)
    res = {
        "device": f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "torch": torch.__version__, "path": "ComfyUI 0.3.75 nodes: UNETLoader, VAELoader, USVWorldPrompt, KSampler euler/simple, VAEDecode / USV VAE Decode",
        "steps": a.steps, "cfg": a.cfg, "size": [33, 256, 256], "prompt": a.prompt,
        "load_seconds": t1 - t0, "sample_seconds": t2 - t1, "decode_seconds": t3 - t2, "seconds_per_video": t3 - t1,
        "usv_decode_seconds": t4 - t3, "usv_decode_max_abs_diff": float((usv_frames - frames).abs().max()),
        "seconds_per_video_usv_decode": t2 - t1 + t4 - t3,
        "world_score": s["score"],
        # The machine is shared: wall-clock seconds stretch with others' load, the process's own
        # CPU seconds (both threads together) much less, so both are kept, with the load beside them.
        "sample_cpu_seconds": c2 - c1, "decode_cpu_seconds": c3 - c2,
        "load_average_after": os.getloadavg()[0], "cores": os.cpu_count(),
    }
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
