"""The entropy policy's own cost per denoising step, at Wan 2.1 1.3B shapes (30 blocks, 12 heads,
head dim 128, 480p x 81 frames = 21 x 30 x 52 tokens, CFG batch 2), against the step it steers.

Measured, each on its own:
- decision: one PolicyRun recomputation (stack the 30 layers' (B, heads) entropies on the
  device, one device->host copy, allocate keep per (layer, head) and merge per layer on the host);
- coarse_entropy: the measurement a dense call makes before a refresh (pool q, k per cube, cube
  scores, entropy);
- vsa keep: a VSA call with one float keep, with a per-head keep tensor of the same mean on the
  device (one host sync per call in the attention API's setup) and on the host (the policy's way:
  counted on the host, no sync);
- dense attention: one SDPA call at the same shape; a dense step is estimated as 30 x SDPA / 0.71
  (attention ~71% of a block's FLOPs at this size, same efficiency assumed for the linear layers).
Overhead share per step = decision / refresh / dense step (a sparse step is shorter: divided by
the budget too, it is still reported).

    python3 bench/policy_overhead.py            # GPU: full size, writes bench/results/policy_overhead.json
    python3 bench/policy_overhead.py --small    # CPU: small sizes, writes bench/results/policy_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from usv_core.policy import Limits, PolicyConfig, PolicyRun, coarse_entropy  # noqa: E402
from usv_core.tiling import num_cubes  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, warm=2, reps=10):
    for _ in range(warm):
        fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return (time.perf_counter() - t) / reps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--small", action="store_true", help="CPU-sized shapes")
    p.add_argument("--budget", type=float, default=0.25)
    p.add_argument("--refresh", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not a.small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layers, heads, d, batch = 30, 12, 128, 2
    grid = (21, 30, 52) if not a.small else (5, 16, 16)
    if a.small:
        heads = 2
    n = grid[0] * grid[1] * grid[2]
    cubes = num_cubes(grid)
    gen = torch.Generator(device="cpu").manual_seed(0)

    # decision: fresh runs so every call recomputes; entropies live on the device as in a real run
    limits = Limits.uniform(layers, heads, keep=(0.02, 1.0), merge=(0.0, 0.75), num_cubes=cubes, fixed=())
    ent = [torch.rand(batch, heads, generator=gen).to(device) * 0.5 + 0.5 for _ in range(layers)]

    def decide():
        run = PolicyRun(PolicyConfig(budget=a.budget, refresh=a.refresh), limits, first_step=1)
        for i, e in enumerate(ent):
            run.observe(i, e)
        run.decision(1, 50)
        return run

    decision_s = timed(decide, device)
    alloc = decide().decisions[1]

    q = torch.randn(batch, heads, n, d, generator=gen).to(device, dtype)
    k = torch.randn(batch, heads, n, d, generator=gen).to(device, dtype)
    v = torch.randn(batch, heads, n, d, generator=gen).to(device, dtype)
    entropy_s = timed(lambda: coarse_entropy(q, k, grid), device)
    sdpa_s = timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v), device,
                   reps=3 if device.type == "cpu" else 10)

    res_vsa = {}
    try:
        from usv_core.attention import supports, vsa_attention

        if device.type == "cuda" and supports(q)[0]:
            row = alloc.keep[len(alloc.keep) // 2]
            per_head_host = torch.from_numpy(row.copy())
            per_head = per_head_host.to(device)
            mean_keep = float(row.mean())
            res_vsa = {
                "keep_mean": mean_keep,
                "vsa_float_keep_ms": 1e3 * timed(lambda: vsa_attention(q, k, v, grid, mean_keep), device),
                "vsa_per_head_keep_device_ms": 1e3 * timed(lambda: vsa_attention(q, k, v, grid, per_head), device),
                "vsa_per_head_keep_host_ms": 1e3 * timed(lambda: vsa_attention(q, k, v, grid, per_head_host), device),
            }
    except Exception as e:  # the overhead numbers above stand on their own
        res_vsa = {"vsa_error": repr(e)}

    step_s = layers * sdpa_s / 0.71
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
    res = {
        "card": name, "torch": torch.__version__, "device": device.type, "dtype": str(dtype),
        "shape": {"layers": layers, "heads": heads, "head_dim": d, "batch": batch, "grid": grid, "tokens": n,
                  "cubes": cubes},
        "budget": a.budget, "refresh": a.refresh,
        "decision_ms": 1e3 * decision_s,
        "coarse_entropy_ms_per_call": 1e3 * entropy_s,
        "sdpa_ms_per_call": 1e3 * sdpa_s,
        "dense_step_estimate_ms": 1e3 * step_s,
        "overhead_share_of_dense_step": decision_s / a.refresh / step_s,
        "overhead_share_of_sparse_step": decision_s / a.refresh / (step_s * a.budget),
        "measurement_share_of_dense_step": layers * entropy_s / step_s,
        "allocation_work": alloc.work,
        **res_vsa,
    }
    out = a.out or os.path.join(ROOT, "bench", "results", "policy_overhead_cpu.json" if device.type == "cpu"
                                else "policy_overhead.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    with torch.no_grad():
        main()
