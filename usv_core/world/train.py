"""Train the USV World model on one GPU: the VAE on rendered clips, then the DiT and caption
encoder with flow matching on cached latents; then evaluate the dense teacher (50 steps, CFG 5)
with the world score and time it.

    python3 -m usv_core.world.train --out DIR --stop-after 535   # GPU; the same command again resumes
    python3 -m usv_core.world.train --out DIR --tiny             # CPU smoke test, seconds

Every phase has a time budget, so the whole run ends on time on any card. The training state goes
to DIR/ckpt (or --ckpt) as it goes: a run stopped by --stop-after (or killed) resumes where the
last checkpoint left it when the same command runs again, with the same budgets, so that training
longer than one command's time limit, or further in a later session (raise --dit-seconds), works.

Writes to DIR: usv_world_{dit,vae,text}.safetensors, curves.json, curves.png, world_teacher.json,
samples.png."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..ema import ema_update
from . import evaluate as ev
from .checkpoint import load_state, save_state
from .dit import WanDiT, set_compiled
from .png import plot_curves, write_png
from .sampling import SHIFT, shift_sigma
from .scene import make_batch
from .score import score_details
from .text import CaptionEncoder
from .vae import WAN21_LATENT_MEAN, WAN21_LATENT_STD, WanVAE, latent_norm
from .vocab import BACKGROUND
from .weights import DIT_FILE, TEXT_FILE, load_vae, save_dit, save_text, save_vae

WINDOWS = (5, 17, 9, 33)  # VAE training windows, frames
TRAIN_SEEDS = ev.EVAL_SEED  # training clips are drawn from [0, TRAIN_SEEDS)
START = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - START:7.1f}s] {msg}", flush=True)


class Stop(Exception):
    """This command's time (--stop-after) is up; the state is saved and the same command resumes."""


def cosine_lr(base: float, frac: float, step: int, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def out_of_time(a) -> bool:
    return a.stop_after > 0 and time.time() - START > a.stop_after


def train_vae(a, dev, rng, curves, ckpt: str) -> WanVAE:
    vae = WanVAE(a.vae_dim)
    if a.identity_init:
        vae.init_for_training()
    vae = vae.to(dev)
    opt = torch.optim.AdamW(vae.parameters(), lr=a.vae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, spent = 0, 0.0
    if os.path.exists(ckpt):
        info = load_state(ckpt, {"vae": vae}, {"vae": opt})
        step, spent, curves["vae"] = info["step"], info["seconds"], info["curve"]
        log(f"vae: resumed at step {step} after {spent:.0f}s")
    curves.setdefault("vae", [])
    bg = torch.tensor(BACKGROUND, device=dev)
    t_start = time.time() - spent
    while step < a.vae_steps and time.time() - t_start < a.vae_seconds:
        if out_of_time(a):
            save_state(ckpt, {"vae": vae}, {"vae": opt}, {"step": step, "seconds": time.time() - t_start, "curve": curves["vae"]})
            raise Stop(f"vae step {step}")
        frac = (time.time() - t_start) / a.vae_seconds
        for g in opt.param_groups:
            g["lr"] = cosine_lr(a.vae_lr, frac, step, 200)
        # Windows of 1 + 4k frames in turn, the batch shrunk to keep the pixels per step: short
        # ones train the first chunk, long ones the decoding of a chunk after chunks, which is how
        # whole clips are decoded (v1 trained 5-frame windows only, and every later chunk's second
        # frame came out at 23-25 dB against 37-40 for the first chunk).
        frames = min(a.frames, WINDOWS[step % len(WINDOWS)])
        batch = max(1, round(a.vae_batch * a.vae_frames / frames))
        clips, _ = make_batch(rng.integers(0, TRAIN_SEEDS, batch), size=a.size, frames=a.frames, device=dev)
        # A random window of crop x crop pixels: convolutions do not care where.
        t0 = int(rng.integers(0, a.frames - frames + 1))
        y0, x0 = (int(v) for v in rng.integers(0, a.size - a.crop + 1, 2))
        clips = clips[:, t0 : t0 + frames, y0 : y0 + a.crop, x0 : x0 + a.crop]
        # Objects are a small share of the pixels but all that matters, and most of the error is at
        # their edges: weight the objects and a pixel around them up.
        obj = ((clips - bg).abs().sum(-1) > 0.05).float()
        obj = F.max_pool2d(obj.flatten(0, 1)[:, None], 3, 1, 1).view(obj.shape)
        weight = (1 + a.object_weight * obj)[:, None]
        x = ev.to_video(clips)
        with ev.autocast(dev):
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
        with ev.autocast(dev):
            lat.append(vae.encode(ev.to_video(clips)).float())
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
def vae_round_trip(vae, a, dev) -> dict:
    """Held-out clips through encode and decode in float32 (as ComfyUI runs the VAE on a CPU) and
    in bf16 autocast: PSNR (of each clip, averaged) and the world score, the ceiling for any
    generated video's score."""
    n = a.roundtrip_clips
    seeds = [ev.EVAL_SEED + 10_000 + i for i in range(n)]
    out: dict = {"roundtrip_clips": n}
    for tag, cast in (("", False), ("_bf16", dev.type == "cuda")):
        if tag and not cast:
            continue
        psnr, rt, real, per_frame = [], [], [], []
        for i in range(0, n, 8):
            clips, caps = make_batch(seeds[i : i + 8], size=a.size, frames=a.frames, device=dev)
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cast):
                rec = ev.from_video(vae.decode(vae.encode(ev.to_video(clips)))).cpu()
            clips = clips.cpu()
            mse = ((rec - clips) ** 2).mean(dim=(2, 3, 4))
            per_frame.append(mse)
            psnr += (10 * torch.log10(1 / mse.mean(1))).tolist()
            rt += [score_details(r, c)["score"] for r, c in zip(rec, caps)]
            if not tag:
                real += [score_details(r, c)["score"] for r, c in zip(clips, caps)]
        out.update({f"vae_psnr_db{tag}": float(np.mean(psnr)), f"vae_psnr_db_min{tag}": float(np.min(psnr)),
                    f"vae_roundtrip_score{tag}": float(np.mean(rt))})
        if not tag:
            out["real_clip_score"] = float(np.mean(real))
            out["vae_psnr_db_per_frame"] = [round(float(v), 2) for v in 10 * torch.log10(1 / torch.cat(per_frame).mean(0))]
        log(f"vae round trip{tag} on {n} held-out clips: psnr {out[f'vae_psnr_db{tag}']:.1f} dB (min {out[f'vae_psnr_db_min{tag}']:.1f}), "
            f"world score {out[f'vae_roundtrip_score{tag}']:.3f}" + (f" (real clips {out['real_clip_score']:.3f})" if not tag else ""))
    return out


def latent_cache(vae, a, dev, rng, path: str):
    if os.path.exists(path):
        t = load_file(path)
        log(f"latent cache: {t['lat'].shape[0]} clips read back")
        return t["lat"].to(dev), t["ids"].to(dev), 0.0
    t = time.time()
    lat, caps, done = [], [], 0
    while done < a.max_clips and time.time() - t < a.encode_seconds:
        z, c = encode_clips(vae, rng.integers(0, TRAIN_SEEDS, a.encode_batch), a, dev)
        lat.append(latent_norm(z).to(torch.bfloat16))
        caps += c
        done += len(c)
    lat = torch.cat(lat)
    ids = torch.tensor([CaptionEncoder().tokenize(c) for c in caps], device=dev)
    log(f"cached {len(caps)} clips as latents {tuple(lat.shape[1:])} in {time.time() - t:.0f}s")
    save_file({"lat": lat.cpu().contiguous(), "ids": ids.cpu().contiguous()}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return lat, ids, time.time() - t


def train_dit(a, dev, rng, lat, ids, curves, ckpt: str):
    dit = WanDiT(a.dim, a.ffn_dim, a.layers).to(dev)
    text = CaptionEncoder().to(dev)
    ema = copy.deepcopy(dit).requires_grad_(False)
    ema_text = copy.deepcopy(text).requires_grad_(False)
    params = list(dit.parameters()) + list(text.parameters())
    ema_params = list(ema.parameters()) + list(ema_text.parameters())
    fused = dev.type == "cuda"
    opt = torch.optim.AdamW(params, lr=a.lr, betas=(0.9, 0.99), weight_decay=0.01, fused=fused)
    modules = {"dit": dit, "text": text, "ema": ema, "ema_text": ema_text}
    step, spent = 0, 0.0
    if os.path.exists(ckpt):
        info = load_state(ckpt, modules, {"dit": opt})
        step, spent, curves["dit"] = info["step"], info["seconds"], info["curve"]
        log(f"dit: resumed at step {step} after {spent:.0f}s")
    elif a.init_from:
        # Shipped weights (the EMA, without the optimizer's state) start a new phase with its own
        # learning-rate schedule over --dit-seconds: how a later session trains a shipped model on.
        for net, ema_net, name in ((dit, ema, DIT_FILE), (text, ema_text, TEXT_FILE)):
            sd = load_file(os.path.join(a.init_from, name))
            for m in (net, ema_net):
                m.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()})
        log(f"dit: starts from the weights in {a.init_from}")
    curves.setdefault("dit", [])
    resumed_at = step
    # A checkpoint without the optimizer's moments (a small one, carried between machines) starts
    # Adam afresh: warm its learning rate up again rather than take full steps on empty moments.
    warm_from = step if step and not opt.state else 0
    compiled = bool(a.compile) and dev.type == "cuda"
    set_compiled(dit, compiled)
    empty = torch.tensor(text.tokenize("", warn=False), device=dev)
    n = lat.shape[0]
    t_start, last_save = time.time() - spent, time.time()

    def save():
        save_state(ckpt, modules, {"dit": opt}, {"step": step, "seconds": time.time() - t_start, "curve": curves["dit"]})

    while step < a.dit_steps and time.time() - t_start < a.dit_seconds:
        if out_of_time(a):
            save()
            raise Stop(f"dit step {step}")
        if time.time() - last_save > a.save_every:
            save()
            last_save = time.time()
        frac = (time.time() - t_start) / a.dit_seconds
        for g in opt.param_groups:
            g["lr"] = cosine_lr(a.lr, frac, step - warm_from, 200)
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
        try:
            with ev.autocast(dev):
                pred = dit(xt, sigma * 1000, text(tok))
            loss = F.mse_loss(pred.float(), noise - x0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        except Exception as e:  # a compiler that fails here should cost speed, not the run
            if not compiled:
                raise
            log(f"torch.compile failed ({type(e).__name__}: {str(e)[:200]}); training eagerly")
            compiled = False
            set_compiled(dit, False)
            continue
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
        ema_update(ema_params, params, a.ema, step)
        if step % 10 == 0:  # every 10th loss only: reading one waits for the GPU
            curves["dit"].append(loss.item())
        if step % a.log_every == 0:
            log(f"dit step {step} loss {loss.item():.4f} lr {opt.param_groups[0]['lr']:.2e}")
        step += 1
    spent = time.time() - t_start
    save()
    log(f"dit: {step} steps in {spent:.0f}s (this command from step {resumed_at}), final loss {np.mean(curves['dit'][-20:]):.4f}")
    return ema.eval(), ema_text.eval(), step, spent


def evaluate(dit, text, vae, a, dev, results):
    prompts = ev.held_out_prompts(a.eval_prompts)
    kw = dict(frames=a.frames, size=a.size, steps=a.steps, batch=a.gen_batch, decode_batch=a.decode_batch)
    sweep = {}
    for cfg in a.cfg_sweep:
        k = min(len(prompts), a.sweep_prompts)
        vids = ev.generate(dit, text, vae, prompts[:k], dev, cfg=cfg, seed=1, **kw)
        sweep[str(cfg)] = float(np.mean([score_details(v, p)["score"] for v, p in zip(vids, prompts)]))
        log(f"cfg {cfg}: world score {sweep[str(cfg)]:.3f} over {k} prompts")
    results["cfg_sweep"] = sweep
    cfg = a.cfg if a.cfg > 0 else float(max(sweep, key=sweep.get))
    t = time.time()
    vids = ev.generate(dit, text, vae, prompts, dev, cfg=cfg, seed=0, **kw)
    results.update(cfg=cfg, steps=a.steps, prompts=len(prompts), batch_generate_seconds=time.time() - t)
    results.update(ev.summarise(vids, prompts))
    log(f"teacher: world score {results['world_score']:.3f} +- {results['world_score_se']:.3f} over {len(prompts)} prompts "
        f"(cfg {cfg}, {a.steps} steps); presence {results['presence']:.3f} shape {results['shape_ok']:.3f} "
        f"smooth {results['smooth']:.3f} moving {results['moving']:.3f}")
    log("colour presence: " + ", ".join(f"{c} {v['presence']:.2f}" for c, v in results["colour_presence"].items()))
    strip = torch.cat([torch.cat(list(v[:: max(1, a.frames // 4)][:5]), 1) for v in vids[:4]], 0)
    write_png(os.path.join(a.out, "samples.png"), (strip.numpy() * 255).round().astype(np.uint8))
    results.update(ev.time_one_video(dit, text, vae, prompts[0], dev, frames=a.frames, size=a.size, steps=a.steps, cfg=cfg, runs=a.time_runs))
    log(f"one video: {results['seconds_per_video']:.2f}s ({results['dit_seconds_per_video']:.2f}s DiT, {a.steps} steps x CFG {cfg})")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default="", help="folder for the training state (default: OUT/ckpt)")
    p.add_argument("--stop-after", type=float, default=0, help="save the state and stop after this many seconds of this command (0: never); the same command resumes")
    p.add_argument("--save-every", type=float, default=120, help="seconds between DiT checkpoints")
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny sizes and budgets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--frames", type=int, default=33)
    p.add_argument("--vae-dim", type=int, default=12, help="base width; 12 is v1's, which sets the decoder's CPU cost")
    p.add_argument("--vae-lr", type=float, default=2e-3)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-frames", type=int, default=5, help="frames of the window that gets the whole --vae-batch (longer ones get fewer clips)")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--object-weight", type=float, default=4.0)
    p.add_argument("--identity-init", type=int, default=1, help="1: start the VAE as a per-frame autoencoder (WanVAE.init_for_training)")
    p.add_argument("--vae-seconds", type=float, default=330)
    p.add_argument("--vae-steps", type=int, default=10**9)
    p.add_argument("--latent-noise", type=float, default=0.03)
    p.add_argument("--stat-clips", type=int, default=64)
    p.add_argument("--roundtrip-clips", type=int, default=32)
    p.add_argument("--encode-batch", type=int, default=32)
    p.add_argument("--encode-seconds", type=float, default=75)
    p.add_argument("--max-clips", type=int, default=16000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--ffn-dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--caption-dropout", type=float, default=0.1)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--compile", type=int, default=1, help="1: torch.compile the DiT on a GPU (falls back to eager if it fails)")
    p.add_argument("--init-from", default="", help="folder laid out like models/ (diffusion_models/, text_encoders/): start the DiT "
                   "and caption encoder from its weights instead of from scratch, with a fresh schedule over --dit-seconds")
    p.add_argument("--dit-seconds", type=float, default=450, help="seconds of DiT training in all, over every command (v2 shipped with 450)")
    p.add_argument("--dit-steps", type=int, default=10**9)
    p.add_argument("--no-eval", action="store_true", help="train and save only")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale of the teacher; 0: the best of --cfg-sweep")
    p.add_argument("--cfg-sweep", type=float, nargs="*", default=[3.0, 5.0, 8.0])
    p.add_argument("--sweep-prompts", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--gen-batch", type=int, default=32)
    p.add_argument("--decode-batch", type=int, default=8)
    p.add_argument("--time-runs", type=int, default=3)
    p.add_argument("--log-every", type=int, default=200)
    a = p.parse_args(argv)
    if a.tiny:
        a.size, a.frames, a.vae_dim, a.crop, a.vae_batch, a.vae_frames = 32, 9, 4, 32, 2, 5
        a.vae_steps = min(a.vae_steps, 3)
        a.stat_clips, a.roundtrip_clips, a.encode_batch, a.max_clips = 4, 2, 4, 8
        a.dim, a.ffn_dim, a.layers, a.batch = 128, 256, 1, 2
        a.dit_steps = min(a.dit_steps, 3)
        a.steps, a.cfg_sweep, a.sweep_prompts, a.eval_prompts, a.gen_batch, a.decode_batch, a.time_runs, a.log_every = 3, [5.0], 2, 2, 2, 2, 1, 1
    return a


def main(argv=None) -> int:
    global START
    START = time.time()  # --stop-after counts from here, also when main is called more than once
    a = parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    ckpt = a.ckpt or os.path.join(a.out, "ckpt")
    os.makedirs(ckpt, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state_path = os.path.join(ckpt, "results.json")
    results: dict = json.load(open(state_path)) if os.path.exists(state_path) else {}
    # A resumed run draws other batches than the first (the same draws again would repeat epochs),
    # and a continuation of trained weights (--init-from, each on a fresh checkpoint folder) other
    # training clips than the continuation before it: its draws also depend on the steps so far.
    runs = len([f for f in os.listdir(ckpt) if f.startswith("run")])
    open(os.path.join(ckpt, f"run{runs}"), "w").close()
    torch.manual_seed(a.seed + 1000 * runs)
    prior = int(results.get("dit_steps", 0)) if a.init_from else 0
    rng = np.random.default_rng([a.seed, runs, prior] if prior else [a.seed, runs])
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # cuDNN autotuning bought no step time for these small convolutions (bench/world_speed.py)
        # and cost half a minute of start-up.
        torch.backends.cudnn.benchmark = False
    card = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    log(f"device {card}, torch {torch.__version__}, command {runs + 1} on {ckpt}")
    curves: dict[str, list[float]] = {}
    results.update({"card": card, "torch": torch.__version__, "args": {k: v for k, v in vars(a).items() if k not in ("out", "ckpt")}})
    results.setdefault("commands", []).append({"started": time.strftime("%Y-%m-%d %H:%M:%S")})
    vae_file = os.path.join(ckpt, "vae.safetensors")

    def keep():
        results["commands"][-1]["seconds"] = time.time() - START
        results["command_seconds"] = sum(c.get("seconds", 0) for c in results["commands"])
        with open(state_path, "w") as f:
            json.dump(results, f, indent=1)

    try:
        if os.path.exists(vae_file):
            vae = load_vae(vae_file, device=dev)
            curves["vae"] = results.get("vae_curve", [])
            log("vae: read back (trained)")
        else:
            t = time.time()
            vae = train_vae(a, dev, rng, curves, os.path.join(ckpt, "vae_state.safetensors"))
            normalise_latents(vae, a, dev, rng)
            # fp16, as shipped: the DiT trains on the latents of the VAE that users get.
            save_vae(vae, vae_file)
            vae = load_vae(vae_file, device=dev)
            results.update(vae_train_seconds=results.get("vae_train_seconds", 0) + time.time() - t, vae_steps=len(curves["vae"]),
                           vae_final_loss=float(np.mean(curves["vae"][-20:])), vae_curve=curves["vae"])
            results.update(vae_round_trip(vae, a, dev))
            keep()
        lat, ids, secs = latent_cache(vae, a, dev, rng, os.path.join(ckpt, "latents.safetensors"))
        if secs:
            results.update(latent_clips=int(lat.shape[0]), encode_seconds=secs)
        dit_state = os.path.join(ckpt, "dit_state.safetensors")
        if a.init_from and not os.path.exists(dit_state):
            # the totals below then count the shipped model's training too (its results.json, if
            # copied into the checkpoint folder, holds them)
            results["dit_before"] = {"steps": results.get("dit_steps", 0), "seconds": results.get("dit_train_seconds", 0)}
        dit, text, steps, spent = train_dit(a, dev, rng, lat, ids, curves, dit_state)
    except Stop as s:
        keep()
        log(f"stopped at {s} after {time.time() - START:.0f}s (--stop-after {a.stop_after:g}); run the same command again to resume")
        return 0
    del lat
    before = results.get("dit_before", {"steps": 0, "seconds": 0})
    results.update(dit_train_seconds=before["seconds"] + spent, dit_steps=before["steps"] + steps,
                   dit_final_loss=float(np.mean(curves["dit"][-20:])))
    results["train_seconds"] = results.get("vae_train_seconds", 0) + results.get("encode_seconds", 0) + results["dit_train_seconds"]
    for name in ("usv_world_vae.safetensors",):
        save_vae(vae, os.path.join(a.out, name))
    save_dit(dit, os.path.join(a.out, "usv_world_dit.safetensors"))
    save_text(text, os.path.join(a.out, "usv_world_text.safetensors"))
    with open(os.path.join(a.out, "curves.json"), "w") as f:
        json.dump(curves, f)
    write_png(os.path.join(a.out, "curves.png"), plot_curves(curves))
    log(f"weights saved; training {results['train_seconds']:.0f}s in all")
    keep()
    if not a.no_eval:
        evaluate(dit, text, vae, a, dev, results)
    keep()
    out = {k: v for k, v in results.items() if k != "vae_curve"}
    with open(os.path.join(a.out, "world_teacher.json"), "w") as f:
        json.dump(out, f, indent=1)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
