"""World score of a distilled USV World student on held-out prompts, sampled as USV DMD Sampler
samples it (the few-step schedule, stochastic re-noising with the sampler's seeded noise, no CFG)
at the given sparsity: the rows of the ablation (sparse-distilled, or a dense student made sparse
only here).

    python3 -m usv_core.distill.evaluate --student OUT/student_dit.safetensors --keep 0.2 --merge 0.5
    python3 -m usv_core.distill.evaluate --student models/diffusion_models/usv_world_dit.safetensors --teacher-steps 50
        (the dense teacher's row at the same frames and size: Euler, shift 8, CFG --cfg)"""

from __future__ import annotations

import argparse
import json
import time

import torch

from .. import dmd
from ..world import evaluate as ev
from ..world.weights import default_path, load_text, load_vae, TEXT_FILE, VAE_FILE
from .config import CUBES
from .models import read_wan_state, wan_from_state
from .student import DENSE, SparseWanDiT, Sparsity


@torch.no_grad()
def generate(student, text, vae, prompts, dev, sigmas, sparsity: Sparsity, *, frames: int, size: int, seed: int = 0,
             batch: int = 16, decode_batch: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(prompts), 16, (frames - 1) // 4 + 1, size // 8, size // 8, generator=g)
    sig = torch.tensor(sigmas, device=dev)
    out = []
    for i in range(0, len(prompts), batch):
        cond = text.encode(prompts[i : i + batch], device=dev, warn=False)
        calls = [0]

        def denoise(x, sigma):
            at = DENSE if calls[0] < sparsity.dense_steps else sparsity
            calls[0] += 1
            s = sigma.expand(x.shape[0])
            with ev.autocast(dev):
                v = student(x, s * 1000.0, cond, at)
            return x - sigma * v.float()

        lat = dmd.sample(denoise, noise[i : i + batch].to(dev), sig, mode="stochastic", noise_seed=seed + i)
        out.append(ev.decode(vae, lat, decode_batch, dev))
    return torch.cat(out)


def score(argv=None) -> dict:
    """Samples and scores as the command line says; returns the result (and writes it to --json)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--student", required=True)
    p.add_argument("--schedule", default="fastwan-3step")
    p.add_argument("--keep", type=float, default=1.0)
    p.add_argument("--merge", type=float, default=0.0)
    p.add_argument("--cube", default="4x4x4", choices=list(CUBES))
    p.add_argument("--dense-steps", type=int, default=0)
    p.add_argument("--tiling", default="cubes", choices=("packed", "cubes"),
                   help="blocks sparse attention selects among: one per cube (distillation's default) or packed edge cubes")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=0,
                   help="sample as the teacher samples instead (this many Euler steps with CFG, dense); 0: the few-step schedule")
    p.add_argument("--cfg", type=float, default=5.0, help="CFG of --teacher-steps")
    p.add_argument("--json", default="", help="also write the result here")
    a = p.parse_args(argv)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    student = wan_from_state(read_wan_state(a.student), cls=SparseWanDiT).to(dev).eval()
    text, vae = load_text(default_path(TEXT_FILE), device=dev), load_vae(default_path(VAE_FILE), device=dev)
    sparsity = Sparsity(keep=a.keep, merge=a.merge, cube=CUBES[a.cube], dense_steps=a.dense_steps,
                        pack_edges=a.tiling == "packed")
    prompts = ev.held_out_prompts(a.prompts)
    t0 = time.time()
    if a.teacher_steps:
        videos = ev.generate(student, text, vae, prompts, dev, frames=a.frames, size=a.size, steps=a.teacher_steps,
                             cfg=a.cfg, batch=a.batch)
        a.schedule = f"euler {a.teacher_steps} steps cfg {a.cfg:g}"
    else:
        videos = generate(student, text, vae, prompts, dev, dmd.preset_sigmas(a.schedule), sparsity,
                          frames=a.frames, size=a.size, batch=a.batch)
    result = {"student": a.student, "schedule": a.schedule, "keep": a.keep, "merge": a.merge, "dense_steps": a.dense_steps,
              "tiling": a.tiling,
              "prompts": len(prompts), "seconds": time.time() - t0, **ev.summarise(videos, prompts)}
    print(f"world score {result['world_score']:.3f} +- {result['world_score_se']:.3f} over {len(prompts)} prompts "
          f"({a.schedule}, keep {a.keep:g}, merge {a.merge:g})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


def main(argv=None) -> int:
    score(argv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
