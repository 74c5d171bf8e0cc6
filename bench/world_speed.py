"""How fast do the USV World models train on this GPU? Times one training step of the VAE for a few
widths and clip lengths (cuDNN autotuning off and on) and of the DiT for two batch sizes, so that
the training budget goes where it buys most. Prints a table; writes $OUT/world_speed.json.

    python3 bench/world_speed.py
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from usv_core.world.dit import WanDiT  # noqa: E402
from usv_core.world.vae import WanVAE  # noqa: E402


def timed(fn, warm=2, reps=4):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def vae_step(dim, frames, crop, batch, channels_last=False):
    vae = WanVAE(dim).cuda()
    if channels_last:
        vae = vae.to(memory_format=torch.channels_last_3d)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = torch.rand(batch, 3, frames, crop, crop, device="cuda") * 2 - 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            rec = vae.decode(vae.encode(x)).float()
        loss = F.l1_loss(rec, x)
        opt.zero_grad()
        loss.backward()
        opt.step()

    t0 = time.perf_counter()
    step()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    return timed(step), first


def dit_step(batch, layers=4):
    dit = WanDiT(256, 1024, layers).cuda()
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-4)
    x = torch.randn(batch, 16, 9, 32, 32, device="cuda")
    ctx = torch.randn(batch, 16, 4096, device="cuda")
    t = torch.rand(batch, device="cuda") * 1000

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = dit(x, t, ctx).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step)


def main():
    rows = []
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    for bench, configs in ((False, ((8, 9), (12, 9), (16, 9), (12, 5))), (True, ((12, 9),))):
        torch.backends.cudnn.benchmark = bench
        for dim, frames in configs:
            per, first = vae_step(dim, frames, 128, 16)
            rows.append({"what": "vae step", "dim": dim, "frames": frames, "crop": 128, "batch": 16, "cudnn_benchmark": bench, "seconds": per, "first_step_seconds": first})
            print(rows[-1], flush=True)
    torch.backends.cudnn.benchmark = False
    per, first = vae_step(12, 9, 128, 16, channels_last=True)
    rows.append({"what": "vae step channels_last_3d", "dim": 12, "frames": 9, "crop": 128, "batch": 16, "seconds": per, "first_step_seconds": first})
    print(rows[-1], flush=True)
    for b in (32, 64):
        rows.append({"what": "dit step", "batch": b, "seconds": dit_step(b)})
        print(rows[-1], flush=True)
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "world_speed.json"), "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
