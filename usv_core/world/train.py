"""Train the USV World model on one GPU in a few minutes: the VAE on rendered clips, then the DiT and
caption encoder with flow matching on cached latents; then evaluate the dense teacher (50 steps,
CFG) with the world score and time it.

    python3 -m usv_core.world.train --out DIR            # GPU, about 8 minutes
    python3 -m usv_core.world.train --out DIR --tiny     # CPU smoke test, seconds

Writes to DIR: usv_world_{dit,vae,text}.safetensors, curves.json, curves.png, world_teacher.json,
samples.png. Every phase has a time budget, so the run ends on time on any card."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from .dit import WanDiT
from .png import plot_curves, write_png
from .sampling import SHIFT, sample, shift_sigma
from .scene import make_batch
from .score import score_details
from .text import CaptionEncoder
from .vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE, latent_norm
from .vocab import BACKGROUND
from .weights import save_dit, save_text, save_vae

EVAL_SEED = 1_000_000_000  # evaluation prompts come from seeds the training draws never use
TRAIN_SEEDS = 1_000_000_000


def log(msg: str, t0=[time.time()]) -> None:
    print(f"[{time.time() - t0[0]:7.1f}s] {msg}", flush=True)


def cosine_lr(base: float, frac: float, step: int, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def to_video(clips: torch.Tensor) -> torch.Tensor:
    """(B, F, H, W, 3) in [0, 1] -> (B, 3, F, H, W) in [-1, 1], the VAE's input."""
    return clips.permute(0, 4, 1, 2, 3) * 2 - 1


def from_video(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)


def train_vae(a, dev, rng, curves) -> WanVAE:
    vae = WanVAE(a.vae_dim)
    if a.identity_init:
        vae.init_for_training()
    vae = vae.to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    bg = torch.tensor(BACKGROUND, device=dev)
    t_start, step, curves["vae"] = time.time(), 0, []
    while step < a.vae_steps and time.time() - t_start < a.vae_seconds:
        frac = (time.time() - t_start) / a.vae_seconds
        for g in opt.param_groups:
            g["lr"] = cosine_lr(a.vae_lr, frac, step, 100)
        clips, _ = make_batch(rng.integers(0, TRAIN_SEEDS, a.vae_batch), size=a.size, frames=a.frames, device=dev)
        # A random window of crop x crop pixels and 1 + 4k frames: convolutions do not care where.
        t0 = int(rng.integers(0, a.frames - a.vae_frames + 1))
        y0, x0 = (int(v) for v in rng.integers(0, a.size - a.crop + 1, 2))
        clips = clips[:, t0 : t0 + a.vae_frames, y0 : y0 + a.crop, x0 : x0 + a.crop]
        # Objects are a small share of the pixels but all that matters: weight them up.
        weight = 1 + 4 * ((clips - bg).abs().sum(-1, keepdim=True) > 0.05).float()
        x = to_video(clips)
        weight = weight.permute(0, 4, 1, 2, 3)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            z = vae.encode(x)
            # Decoding slightly perturbed latents makes the decoder forgive a DiT's small errors.
            z = z + a.latent_noise * z.detach().std(dim=(0, 2, 3, 4), keepdim=True) * torch.randn_like(z)
            rec = vae.decode(z).float()
        err = rec - x
        loss = (weight * (err.abs() + err ** 2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        curves["vae"].append(loss.item())
        if step % a.log_every == 0:
            log(f"vae step {step} loss {loss.item():.4f}")
        step += 1
    log(f"vae: {step} steps in {time.time() - t_start:.0f}s, final loss {np.mean(curves['vae'][-20:]):.4f}")
    return vae.eval()


@torch.no_grad()
def encode_clips(vae: WanVAE, seeds, a, dev) -> tuple[torch.Tensor, list[str]]:
    lat, caps = [], []
    for i in range(0, len(seeds), a.encode_batch):
        clips, c = make_batch(seeds[i : i + a.encode_batch], size=a.size, frames=a.frames, device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            lat.append(vae.encode(to_video(clips)).float())
        caps += c
    return torch.cat(lat), caps


@torch.no_grad()
def normalise_latents(vae: WanVAE, a, dev, rng) -> None:
    """Fold an affine map into the VAE so that its raw latents follow Wan 2.1's statistics, which
    ComfyUI divides out: the DiT then sees latents of zero mean and unit variance per channel."""
    z, _ = encode_clips(vae, rng.integers(0, TRAIN_SEEDS, a.stat_clips), a, dev)
    m = z.mean(dim=(0, 2, 3, 4))
    s = z.std(dim=(0, 2, 3, 4)).clamp_min(1e-4)
    wm = torch.tensor(WAN21_LATENT_MEAN, device=dev)
    ws = torch.tensor(WAN21_LATENT_STD, device=dev)
    vae.fold_latent_affine(ws / s, wm - ws * m / s)
    z2, _ = encode_clips(vae, rng.integers(0, TRAIN_SEEDS, a.encode_batch), a, dev)
    n = latent_norm(z2)
    log(f"latents normalised: per-channel mean {n.mean(dim=(0, 2, 3, 4)).abs().max():.3f} (max abs), std {n.std(dim=(0, 2, 3, 4)).min():.2f}..{n.std(dim=(0, 2, 3, 4)).max():.2f}")


@torch.no_grad()
def decode(vae: WanVAE, n: torch.Tensor, batch: int, dev) -> torch.Tensor:
    """Normalised latents -> (B, F, H, W, 3) in [0, 1] on the CPU."""
    out = []
    for i in range(0, n.shape[0], batch):
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out.append(from_video(vae.decode(latent_norm(n[i : i + batch], inverse=True))).cpu())
    return torch.cat(out)


def train_dit(a, dev, rng, lat, ids, curves):
    dit = WanDiT(a.dim, a.ffn_dim, a.layers).to(dev)
    text = CaptionEncoder().to(dev)
    ema = copy.deepcopy(dit).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    params = list(dit.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01)
    empty = torch.tensor(text.tokenize("", warn=False), device=dev)
    t_start, step, curves["dit"] = time.time(), 0, []
    n = lat.shape[0]
    while step < a.dit_steps and time.time() - t_start < a.dit_seconds:
        frac = (time.time() - t_start) / a.dit_seconds
        for g in opt.param_groups:
            g["lr"] = cosine_lr(a.lr, frac, step, 200)
        idx = torch.from_numpy(rng.integers(0, n, a.batch)).to(dev)
        x0 = lat[idx].float()
        tok = ids[idx]
        drop = torch.rand(a.batch, device=dev) < a.caption_dropout
        tok = torch.where(drop[:, None], empty[None], tok)
        u = torch.rand(a.batch, device=dev)
        # Half the draws follow the sampler's shifted schedule, half are uniform, so both the
        # high-noise steps where sampling spends its time and the low-noise detail get trained.
        sigma = torch.where(torch.rand(a.batch, device=dev) < 0.5, shift_sigma(u, SHIFT), u).clamp(1e-3, 1.0)
        noise = torch.randn_like(x0)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            pred = dit(xt, sigma * 1000, text(tok))
        loss = F.mse_loss(pred.float(), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(a.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(list(ema.parameters()) + list(ema_text.parameters()), params):
                e.lerp_(p, 1 - decay)
        curves["dit"].append(loss.item())
        if step % a.log_every == 0:
            log(f"dit step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
        step += 1
    log(f"dit: {step} steps in {time.time() - t_start:.0f}s, final loss {np.mean(curves['dit'][-50:]):.4f}")
    return ema.eval(), ema_text.eval(), step


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def generate(dit, text, vae, prompts, a, dev, cfg, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    lt, lh = (a.frames - 1) // 4 + 1, a.size // 8
    noise = torch.randn(len(prompts), 16, lt, lh, lh, generator=g).to(dev)
    cond = text.encode(prompts, device=dev)
    uncond = text.encode([""] * len(prompts), device=dev)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        n = sample(dit, cond, uncond, noise, steps=a.steps, cfg=cfg)
    return decode(vae, n.float(), a.decode_batch, dev)


def evaluate(dit, text, vae, a, dev, results):
    prompts = [make_batch([EVAL_SEED + i], size=16, frames=1)[1][0] for i in range(a.eval_prompts)]
    sweep = {}
    for cfg in a.cfg_sweep:
        k = min(len(prompts), a.sweep_prompts)
        vids = generate(dit, text, vae, prompts[:k], a, dev, cfg, seed=1)
        sweep[str(cfg)] = float(np.mean([score_details(v, p)["score"] for v, p in zip(vids, prompts)]))
        log(f"cfg {cfg}: world score {sweep[str(cfg)]:.3f} over {k} prompts")
    results["cfg_sweep"] = sweep
    # The teacher uses the guidance scale that scored best (or the one asked for).
    cfg = a.cfg if a.cfg > 0 else float(max(sweep, key=sweep.get))
    t = time.time()
    vids = generate(dit, text, vae, prompts, a, dev, cfg, seed=0)
    details = [score_details(v, p) for v, p in zip(vids, prompts)]
    scores = [d["score"] for d in details]
    results.update(cfg=cfg, steps=a.steps, prompts=len(prompts), world_score=float(np.mean(scores)), world_score_std=float(np.std(scores)),
                   per_prompt=[{"prompt": p, "score": round(s, 4)} for p, s in zip(prompts, scores)], batch_eval_seconds=time.time() - t)
    log(f"teacher: world score {np.mean(scores):.3f} over {len(prompts)} prompts (cfg {cfg}, {a.steps} steps)")
    strip = torch.cat([torch.cat(list(v[:: max(1, a.frames // 4)][:5]), 1) for v in vids[:4]], 0)
    write_png(os.path.join(a.out, "samples.png"), (strip.numpy() * 255).round().astype(np.uint8))

    # One video at a time, as a user makes them: median of a few runs after a warm-up.
    times, dit_times = [], []
    for i in range(a.time_runs + 1):
        sync(dev)
        t0 = time.perf_counter()
        g = torch.Generator(device="cpu").manual_seed(i)
        lt, lh = (a.frames - 1) // 4 + 1, a.size // 8
        noise = torch.randn(1, 16, lt, lh, lh, generator=g).to(dev)
        cond, uncond = text.encode([prompts[i % len(prompts)]], device=dev), text.encode([""], device=dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            n = sample(dit, cond, uncond, noise, steps=a.steps, cfg=cfg)
        sync(dev)
        t1 = time.perf_counter()
        decode(vae, n.float(), 1, dev)
        sync(dev)
        if i > 0:
            times.append(time.perf_counter() - t0)
            dit_times.append(t1 - t0)
    results.update(seconds_per_video=float(np.median(times)), dit_seconds_per_video=float(np.median(dit_times)),
                   vae_decode_seconds=float(np.median(times) - np.median(dit_times)))
    log(f"one video: {np.median(times):.2f}s ({np.median(dit_times):.2f}s DiT, {a.steps} steps x CFG {cfg})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny sizes and budgets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--vae-dim", type=int, default=12)
    p.add_argument("--vae-lr", type=float, default=1.5e-3)
    p.add_argument("--vae-batch", type=int, default=24)
    p.add_argument("--vae-frames", type=int, default=5, help="1 + 4k frames per training window (5: frame 0 and one chunk)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--identity-init", type=int, default=1, help="1: start the VAE as a per-frame autoencoder (WanVAE.init_for_training)")
    p.add_argument("--vae-seconds", type=float, default=150)
    p.add_argument("--vae-steps", type=int, default=10**9)
    p.add_argument("--latent-noise", type=float, default=0.05)
    p.add_argument("--stat-clips", type=int, default=64)
    p.add_argument("--encode-batch", type=int, default=32)
    p.add_argument("--encode-seconds", type=float, default=45)
    p.add_argument("--max-clips", type=int, default=12000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--dit-seconds", type=float, default=220)
    p.add_argument("--dit-steps", type=int, default=10**9)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=0.0, help="guidance scale of the teacher; 0: the best of --cfg-sweep")
    p.add_argument("--cfg-sweep", type=float, nargs="*", default=[3.0, 5.0, 8.0])
    p.add_argument("--sweep-prompts", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--time-runs", type=int, default=3)
    p.add_argument("--log-every", type=int, default=100)
    a = p.parse_args(argv)
    if a.tiny:
        a.size, a.frames, a.vae_dim, a.crop, a.vae_batch, a.vae_frames = 32, 5, 4, 32, 2, 5
        a.vae_steps, a.stat_clips, a.encode_batch, a.max_clips = 3, 4, 4, 8
        a.dim, a.ffn_dim, a.layers, a.batch, a.dit_steps = 128, 256, 1, 2, 3
        a.steps, a.cfg_sweep, a.sweep_prompts, a.eval_prompts, a.decode_batch, a.time_runs, a.log_every = 3, [5.0], 2, 2, 2, 1, 1
    return a


def main(argv=None) -> None:
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN autotuning bought no step time for these small convolutions (bench/world_speed.py)
        # and cost half a minute of start-up.
        torch.backends.cudnn.benchmark = False
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    log(f"device {card}, torch {torch.__version__}")
    t_all = time.time()
    curves: dict[str, list[float]] = {}
    results: dict = {"card": card, "torch": torch.__version__, "args": {k: v for k, v in vars(a).items() if k != "out"}}

    t = time.time()
    vae = train_vae(a, dev, rng, curves)
    normalise_latents(vae, a, dev, rng)
    results["vae_train_seconds"] = time.time() - t
    save_vae(vae, os.path.join(a.out, "usv_world_vae.safetensors"))

    # Round trip of real clips through the VAE: the ceiling for any generated video's score.
    clips, caps = make_batch(rng.integers(0, TRAIN_SEEDS, 16 if not a.tiny else 2), size=a.size, frames=a.frames, device=dev)
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        rec = from_video(vae.decode(vae.encode(to_video(clips)))).cpu()
    clips = clips.cpu()
    results["vae_psnr_db"] = float(10 * torch.log10(1 / F.mse_loss(rec, clips)))
    results["vae_roundtrip_score"] = float(np.mean([score_details(r, c)["score"] for r, c in zip(rec, caps)]))
    results["real_clip_score"] = float(np.mean([score_details(r, c)["score"] for r, c in zip(clips, caps)]))
    log(f"vae round trip: psnr {results['vae_psnr_db']:.1f} dB, world score {results['vae_roundtrip_score']:.3f} (real clips {results['real_clip_score']:.3f})")

    t = time.time()
    lat, caps, seeds_done = [], [], 0
    while seeds_done < a.max_clips and time.time() - t < a.encode_seconds:
        z, c = encode_clips(vae, rng.integers(0, TRAIN_SEEDS, a.encode_batch), a, dev)
        lat.append(latent_norm(z).to(torch.bfloat16))
        caps += c
        seeds_done += len(c)
    lat = torch.cat(lat)
    text_ids = torch.tensor([CaptionEncoder().tokenize(c) for c in caps], device=dev)
    results.update(latent_clips=len(caps), encode_seconds=time.time() - t)
    log(f"cached {len(caps)} clips as latents {tuple(lat.shape[1:])} in {time.time() - t:.0f}s")

    t = time.time()
    dit, text, steps = train_dit(a, dev, rng, lat, text_ids, curves)
    results.update(dit_train_seconds=time.time() - t, dit_steps=steps, dit_final_loss=float(np.mean(curves["dit"][-50:])),
                   vae_steps=len(curves["vae"]), vae_final_loss=float(np.mean(curves["vae"][-20:])))
    save_dit(dit, os.path.join(a.out, "usv_world_dit.safetensors"))
    save_text(text, os.path.join(a.out, "usv_world_text.safetensors"))
    with open(os.path.join(a.out, "curves.json"), "w") as f:
        json.dump(curves, f)
    write_png(os.path.join(a.out, "curves.png"), plot_curves(curves))
    results["train_seconds"] = time.time() - t_all
    log(f"weights saved after {time.time() - t_all:.0f}s")

    evaluate(dit, text, vae, a, dev, results)
    results["total_seconds"] = time.time() - t_all
    with open(os.path.join(a.out, "world_teacher.json"), "w") as f:
        json.dump(results, f, indent=1)
    log("done")


if __name__ == "__main__":
    main()
