"""Entropy policy vs static budget vs dense, and fixed settings without a policy, on the USV World
model through ComfyUI's own nodes (UNETLoader, USVWorldPrompt, USVSparseAttention +
USVTokenMerge with one USVPolicy, KSampler euler/simple with CFG, VAE decode). Same seeds for
every configuration; for each: world score, fidelity to the dense video of the same seed (PSNR of
decoded frames, relative L2 of latents), the estimated work share from the run's own records (USV
Report's cost model), seconds per video on this machine, and the policy's host time per step.
Writes bench/results/policy_world.json (--out to change).

    .venv/bin/python bench/policy_world.py [--prompts 3] [--steps 10] [--frames 17] [--budgets 0.5 0.3]
    python3 bench/policy_world.py --prompts 24 --steps 50 --frames 33 --budgets 0.7 0.5 --power \
        --dense-steps 15 --fixed keep=0.5,dense=15 merge=0.25,dense=15      # the GPU runs in docs/policy.md
    .venv/bin/python bench/policy_world.py --student usv_world_student.safetensors --prompts 64 --budgets 0.714 \
        --dense-steps 0 --merge-cap 0 --fixed keep=0.2,dense=0 --decoder world     # the student's policy rows (CPU)

A budget is a share of dense work by the cost model at this model's size (USV Report prints the
attention share: 36% for USV World at 17 frames, so keep 0.2 everywhere costs 0.714); a budget
below what the keep floor allows ends at the floor for every policy alike.

On the CPU, sparse attention runs the exact PyTorch reference (not faster than dense attention):
the seconds measure this machine, the work share what the kernels would skip.
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

PROMPTS = ["a red circle and a blue square", "a yellow triangle", "a green square, a white circle and a purple triangle",
           "a blue circle and a red triangle", "a white square and a yellow circle"]


def prompts(n: int) -> list[str]:
    """The five above, then captions of held-out world clips (the teacher's evaluation seeds)."""
    from usv_core.world.scene import make_batch
    from usv_core.world.evaluate import EVAL_SEED

    extra = [make_batch([EVAL_SEED + i], size=16, frames=1)[1][0] for i in range(max(0, n - len(PROMPTS)))]
    return (PROMPTS + extra)[:n]


def fixed_config(spec: str, tiling: str = "packed") -> dict:
    """'keep=0.5,merge=0.3,dense=10,metric=hidden,tiling=cubes' -> fixed settings without a policy
    (missing parts: off; metric: token merging's similarity, keys by default; tiling: the blocks
    attention selects among: packed edge cubes, or one block per cube, the default for a student
    since the shipped one was distilled on cubes)."""
    out = dict(keep=1.0, merge=0.0, dense=1, metric="keys", tiling=tiling)
    for part in filter(None, spec.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise SystemExit(f"--fixed: unknown key {key!r} in {spec!r} (keys: {', '.join(out)})")
        out[key] = type(out[key])(value)
    if out["tiling"] not in ("packed", "cubes"):
        raise SystemExit(f"--fixed: tiling is 'packed' or 'cubes', got {out['tiling']!r}")
    return out


def configs(budgets, early, power, fixed=(), tiling="packed"):
    out = [("dense", None, None)]
    out += [(spec, None, fixed_config(spec, tiling)) for spec in fixed]
    for b in budgets:
        out.append((f"static@{b:g}", b, dict(mode="static")))
        out.append((f"entropy@{b:g}", b, dict(mode="entropy", gamma=1.0)))
        if power:
            out.append((f"entropy-power@{b:g}", b, dict(mode="entropy", gamma=1.0, weight="power")))
        for e in early:
            out.append((f"entropy+early{e:g}@{b:g}", b, dict(mode="entropy", gamma=1.0, early=e)))
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--frames", type=int, default=17, help="video frames (4k+1); latent frames = (frames-1)/4+1")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--budgets", type=float, nargs="*", default=[0.5, 0.3])
    p.add_argument("--keep-floor", type=float, default=0.02)
    p.add_argument("--merge-cap", type=float, default=0.75)
    p.add_argument("--refresh", type=int, default=2)
    p.add_argument("--dense-steps", type=int, default=1, help="steps run dense before the policy steers")
    p.add_argument("--early", type=float, nargs="*", default=[],
                   help="also the entropy policy with these early ramps (budget x (1 + e) first, x (1 - e) last)")
    p.add_argument("--power", action="store_true", help="also the (1 - h) ** gamma weight rule")
    p.add_argument("--fixed", nargs="*", default=[], metavar="SPEC",
                   help="fixed settings without a policy, e.g. keep=0.25 merge=0.5 keep=0.25,merge=0.5,dense=10")
    p.add_argument("--student", default="", metavar="UNET",
                   help="a few-step student in diffusion_models (usv_world_student.safetensors): sampled with USV DMD "
                        "Sigmas (--preset) and USV DMD Sampler, no CFG; --steps and --cfg are then unused")
    p.add_argument("--preset", default="fastwan-3step", help="USV DMD Sigmas preset of --student")
    p.add_argument("--dmd-mode", default="stochastic", choices=("stochastic", "deterministic"),
                   help="USV DMD Sampler's mode for --student")
    p.add_argument("--decoder", choices=("comfy", "world"), default="comfy",
                   help="VAE decode: ComfyUI's, or usv_core.world's whole-clip decoder of the same weights (equal to "
                        "1e-4, tests/test_world_models.py; three times faster on a CPU)")
    p.add_argument("--heatmaps", action="store_true", help="also write USV Report's heatmap of each policy row's first prompt beside --out")
    p.add_argument("--no-decode", action="store_true", help="latent error only (no VAE decode, no world score)")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "policy_world.json"))
    a = p.parse_args()

    import torch
    from harness import runtime

    sys.path.insert(0, os.path.join(ROOT, "bench"))
    from wan_model import av_stand_in

    av_stand_in()
    runtime.boot()
    import nodes

    from usv_core.policy import PolicyConfig
    from usv_core.world import score_details

    report_mod = runtime.pack_module("nodes.report")
    usv_patch = runtime.pack_module("nodes.usv_patch")
    sparse_node = nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    merge_node = nodes.NODE_CLASS_MAPPINGS["USVTokenMerge"]
    prompt_node = nodes.NODE_CLASS_MAPPINGS["USVWorldPrompt"]

    base = nodes.UNETLoader().load_unet(a.student or "usv_world_dit.safetensors", "default")[0]
    vae = nodes.VAELoader().load_vae("usv_world_vae.safetensors")[0]
    if a.decoder == "world":
        from usv_core.world.evaluate import from_video
        from usv_core.world.weights import load_vae

        world_vae = load_vae()
    neg = prompt_node.execute("").result[0]
    lat_frames = (a.frames - 1) // 4 + 1
    latent = {"samples": torch.zeros(1, 16, lat_frames, a.size // 8, a.size // 8)}

    def write() -> None:  # after every configuration, so a run cut short keeps what it measured
        res = {
            "device": (torch.cuda.get_device_name() if torch.cuda.is_available()
                       else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
            "torch": torch.__version__,
            "model": "USV World (models/diffusion_models/usv_world_dit.safetensors)",
            "path": "ComfyUI 0.3.75 in process: UNETLoader -> USVSparseAttention + USVTokenMerge (policy) -> KSampler "
                    "euler/simple -> VAE decode",
            "settings": vars(a) | {"out": os.path.relpath(a.out, ROOT)},
            "notes": "work_share_controlled is the cost model's share over the steps after the dense ones, "
                     "work_share_run over all steps" + ("" if torch.cuda.is_available() else
                     "; seconds are CPU seconds with the PyTorch reference for sparse attention (no speedup expected)"),
            "results": rows,
        }
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)

    def sample_student(model, seed, pos, empty):
        """What SamplerCustomAdvanced runs with BasicGuider (cfg 1: no uncond pass), USV DMD Sigmas
        and USV DMD Sampler."""
        import comfy.sample

        sigmas = nodes.NODE_CLASS_MAPPINGS["USVDMDSigmas"].execute(model, a.preset, "1000, 750, 500, 250", 1.0).result[0]
        sampler = nodes.NODE_CLASS_MAPPINGS["USVDMDSampler"].execute(a.dmd_mode, seed).result[0]
        noise = comfy.sample.prepare_noise(empty, seed)
        return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, pos, pos, empty, seed=seed)

    rows, dense_cache = [], {}
    tiling = "cubes" if a.student else "packed"
    for name, budget, kw in configs(a.budgets, a.early, a.power, a.fixed, tiling):
        if kw is None:
            model = base
        elif budget is None:
            model = base
            if kw["keep"] < 1:
                model = sparse_node.execute(model, kw["keep"], kw["dense"], "", "4x4x4", "none",
                                            blocks=kw["tiling"]).result[0]
            if kw["merge"] > 0:
                model = merge_node.execute(model, kw["merge"], kw["dense"], "", kw["metric"]).result[0]
        else:
            cfg = PolicyConfig(budget=budget, refresh=a.refresh, **kw)
            model = sparse_node.execute(base, a.keep_floor, a.dense_steps, "", "4x4x4", "none", cfg,
                                        blocks=tiling).result[0]
            if a.merge_cap > 0:
                model = merge_node.execute(model, a.merge_cap, a.dense_steps, "", "keys", cfg).result[0]
        per = []
        for i, prompt in enumerate(prompts(a.prompts)):
            pos = prompt_node.execute(prompt).result[0]
            t0 = time.perf_counter()
            if a.student:
                samples = sample_student(model, 100 + i, pos, latent["samples"])
            else:
                samples = nodes.KSampler().sample(model, 100 + i, a.steps, a.cfg, "euler", "simple", pos, neg, latent,
                                                  denoise=1.0)[0]["samples"]
            t1 = time.perf_counter()
            frames = None
            row = {"prompt": prompt, "sample_seconds": t1 - t0}
            if not a.no_decode:
                if a.decoder == "world":  # the sampler's output is the VAE's raw latent, as VAEDecode takes it
                    with torch.no_grad():
                        frames = from_video(world_vae.decode(samples.float()))[0]
                else:
                    frames = vae.decode(samples)
                frames = frames.reshape(-1, *frames.shape[-3:]).float().clamp(0, 1)
                row["decode_seconds"] = time.perf_counter() - t1
                row["world_score"] = score_details(frames, prompt)["score"]
            if kw is None:
                dense_cache[i] = (samples, frames)
            else:
                ds, df = dense_cache[i]
                if frames is not None:
                    mse = float(((frames - df) ** 2).mean())
                    row["psnr_vs_dense_db"] = 10 * torch.log10(torch.tensor(1.0 / max(mse, 1e-12))).item()
                row["latent_rel_l2_vs_dense"] = float((samples - ds).norm() / ds.norm())
                patch = usv_patch.get_patch(model)
                run = patch.last_run
                image, text = report_mod.report(model)
                if i == 0 and run.policy is not None and a.heatmaps:
                    # USV Report's heatmap of the first prompt: where the policy spent the budget
                    from usv_core.world.png import write_png

                    png = os.path.splitext(a.out)[0] + f"_{name.replace('@', '_')}.png"
                    write_png(png, (image[0].numpy() * 255).round().astype("uint8"))
                from usv_core import telemetry

                dm = model.model.diffusion_model
                t = report_mod.run_tables(run, len(dm.blocks))
                share, _ = report_mod.run_attention_share(dm, run.grid)  # what the policy budgets with too
                n = telemetry.summary_numbers(t, share)
                # the controlled steps only (the dense ones are the same for every configuration)
                first = kw["dense"] if budget is None else a.dense_steps
                tc = {k: v[:, first:] for k, v in t.items()}
                nc = telemetry.summary_numbers(tc, share)
                row.update(work_share_run=n["work"], work_share_controlled=nc["work"], attended=nc["attended"],
                           tokens_kept=nc["tokens"], attention_share=share, report=text)
                if run.policy is not None:
                    row.update(policy_decisions=len(run.policy.refreshed_at), policy_seconds=run.policy.seconds,
                               policy_share_of_step=run.policy.seconds / ((t1 - t0) / a.steps) / a.steps)
            per.append(row)
            print(name, json.dumps({k: v for k, v in row.items() if k != "report"}), flush=True)
        keys = [k for k in per[0] if isinstance(per[0][k], float)]
        summary = {k: sum(r[k] for r in per) / len(per) for k in keys}
        summary["seconds_per_video"] = summary["sample_seconds"] + summary.get("decode_seconds", 0.0)
        rows.append({"config": name, "budget": budget, "mean": summary, "per_prompt": per})
        write()

    for r in rows:
        m = r["mean"]
        print(f"{r['config']:>20}: world {m.get('world_score', float('nan')):.3f}  "
              f"psnr {m.get('psnr_vs_dense_db', float('inf')):.2f}  latent err {m.get('latent_rel_l2_vs_dense', 0.0):.3f}  "
              f"work {m.get('work_share_controlled', 1.0):.3f}  s/video {m['seconds_per_video']:.1f}")


if __name__ == "__main__":
    import torch

    with torch.no_grad():
        main()
