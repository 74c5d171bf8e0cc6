"""The main job: generate a video through the USV nodes in the real ComfyUI.

With no GPU and no weights of your own it uses the embedded USV World model (models/): by default
its few-step student (3 steps through USV DMD Sigmas and USV DMD Sampler, sparse attention at the
keep it was distilled with, no CFG), with --teacher the dense-trained teacher; it prints the
video's world score. Without those files a tiny random Wan stands in and the video is noise-like
by design.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WORLD_DIT = os.path.join(ROOT, "models", "diffusion_models", "usv_world_dit.safetensors")
WORLD_STUDENT = os.path.join(ROOT, "models", "diffusion_models", "usv_world_student.safetensors")
WORLD_VAE = os.path.join(ROOT, "models", "vae", "usv_world_vae.safetensors")
# The student was distilled at keep 0.2 on every step of fastwan-3step (bench/world.md): the
# nodes must run it as it was trained.
STUDENT_KEEP, STUDENT_PRESET, STUDENT_STEPS = 0.2, "fastwan-3step", 3
TEACHER_STEPS, TEACHER_CFG, TEACHER_KEEP, TEACHER_DENSE_STEPS = 20, 5.0, 0.5, 6


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="a red circle and a blue square", help="what to generate")
    p.add_argument("--teacher", action="store_true",
                   help=f"the dense-trained teacher instead of the few-step student: {TEACHER_STEPS} Euler steps with "
                        f"CFG {TEACHER_CFG:g}, keep {TEACHER_KEEP:g} after {TEACHER_DENSE_STEPS} dense steps")
    p.add_argument("--steps", type=int, default=None,
                   help=f"sampling steps (student: {STUDENT_STEPS}, the schedule it was trained on; teacher: {TEACHER_STEPS})")
    p.add_argument("--cfg", type=float, default=TEACHER_CFG, help="the teacher's guidance scale (the student uses none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=float, default=None,
                   help=f"USV Sparse Attention: share of key cubes kept (student: {STUDENT_KEEP:g}, as trained; teacher: {TEACHER_KEEP:g})")
    p.add_argument("--dense-steps", type=int, default=None,
                   help=f"USV Sparse Attention: first steps run dense (student: 0; teacher: {TEACHER_DENSE_STEPS})")
    p.add_argument("--frames", type=int, default=17, help="video length (4k + 1 frames)")
    p.add_argument("--size", type=int, default=256, help="width and height in pixels")
    p.add_argument("--out", default=os.path.join("output", "usv_demo.mp4"), help="where the video goes")
    a = p.parse_args(argv)
    if a.steps is not None and a.steps < 1:
        p.error(f"--steps must be at least 1, got {a.steps}")
    teacher = a.teacher = a.teacher or not os.path.exists(WORLD_STUDENT)
    a.steps = a.steps or (TEACHER_STEPS if teacher else STUDENT_STEPS)
    if a.keep is None:
        a.keep = TEACHER_KEEP if teacher else STUDENT_KEEP
    a.dense_steps = (TEACHER_DENSE_STEPS if teacher else 0) if a.dense_steps is None else a.dense_steps
    return a


def student_sigmas(steps: int) -> dict:
    """USV DMD Sigmas' inputs: the trained preset at its own step count, else evenly spaced
    timesteps over the same range (1000 down to 522), which the student has at least seen."""
    if steps == STUDENT_STEPS:
        return {"preset": STUDENT_PRESET, "timesteps": "1000, 750, 500, 250", "shift": 1.0}
    ts = [1000.0 - (1000.0 - 522.0) * i / max(1, steps - 1) for i in range(steps)]
    return {"preset": "custom", "timesteps": ", ".join(f"{t:.0f}" for t in ts), "shift": 1.0}


def world_student_graph(prompt: str, seed: int = 0, steps: int = STUDENT_STEPS, keep: float = STUDENT_KEEP,
                        dense_steps: int = 0, frames: int = 17, size: int = 256, decode: str = "USVVAEDecode") -> dict:
    """The student's graph: USV Sparse Attention at its trained keep on the cubes it was distilled
    with, USV DMD Sigmas and USV DMD Sampler, no CFG (BasicGuider), USV VAE Decode (ComfyUI's
    decode where it cannot serve)."""
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": os.path.basename(WORLD_STUDENT), "weight_dtype": "default"}},
        "usv": {"class_type": "USVSparseAttention", "inputs": {"model": ["unet", 0], "keep": keep, "dense_steps": dense_steps,
                                                               "dense_blocks": "", "cube": "4x4x4", "blocks": "cubes"}},
        "pos": {"class_type": "USVWorldPrompt", "inputs": {"prompt": prompt}},
        "guider": {"class_type": "BasicGuider", "inputs": {"model": ["usv", 0], "conditioning": ["pos", 0]}},
        "sigmas": {"class_type": "USVDMDSigmas", "inputs": {"model": ["usv", 0], **student_sigmas(steps)}},
        "sampler": {"class_type": "USVDMDSampler", "inputs": {"mode": "stochastic", "noise_seed": seed}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": size, "height": size, "length": frames, "batch_size": 1}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": os.path.basename(WORLD_VAE)}},
        "decode": {"class_type": decode, "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "video": {"class_type": "CreateVideo", "inputs": {"images": ["decode", 0], "fps": 16.0}},
        "save": {"class_type": "SaveVideo",
                 "inputs": {"video": ["video", 0], "filename_prefix": "usv_demo", "format": "mp4", "codec": "h264"}},
    }


def teacher_graph(args, nodes, unet: str, vae: str, world: bool) -> dict:
    g: dict = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo",
                   "inputs": {"width": args.size, "height": args.size, "length": args.frames, "batch_size": 1}},
    }
    model = ["unet", 0]
    if "USVSparseAttention" in nodes.NODE_CLASS_MAPPINGS:
        g["usv"] = {"class_type": "USVSparseAttention",
                    "inputs": {"model": model, "keep": args.keep, "dense_steps": args.dense_steps, "dense_blocks": "", "cube": "4x4x4"}}
        model = ["usv", 0]
    if world:
        g["pos"] = {"class_type": "USVWorldPrompt", "inputs": {"prompt": args.prompt}}
        g["neg"] = {"class_type": "USVWorldPrompt", "inputs": {"prompt": ""}}
    else:
        from harness import test_nodes, tiny_models

        g["pos"] = {"class_type": "USVTestConditioning",
                    "inputs": {"name": test_nodes.put_tensor(tiny_models.text_conditioning(args.seed))}}
        g["neg"] = {"class_type": "USVTestConditioning",
                    "inputs": {"name": test_nodes.put_tensor(tiny_models.text_conditioning(args.seed) * 0)}}
    g["sample"] = {"class_type": "KSampler", "inputs": {
        "model": model, "seed": args.seed, "steps": args.steps, "cfg": args.cfg, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
        "denoise": 1.0}}
    decode = "USVVAEDecode" if "USVVAEDecode" in nodes.NODE_CLASS_MAPPINGS else "VAEDecode"
    g["decode"] = {"class_type": decode, "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
    g["video"] = {"class_type": "CreateVideo", "inputs": {"images": ["decode", 0], "fps": 16.0}}
    g["save"] = {"class_type": "SaveVideo",
                 "inputs": {"video": ["video", 0], "filename_prefix": "usv_demo", "format": "mp4", "codec": "h264"}}
    return g


def main(argv=None) -> int:
    args = parse_args(argv)
    from harness import runtime, tiny_models

    # ComfyUI warns at boot about optional extras (audio, upscalers) that the demo never uses.
    logging.disable(logging.WARNING)
    try:
        nodes = runtime.boot()
    finally:
        logging.disable(logging.NOTSET)
    world = os.path.exists(WORLD_DIT) and os.path.exists(WORLD_VAE) and "USVWorldPrompt" in nodes.NODE_CLASS_MAPPINGS
    if world and not args.teacher:
        # the pack lists its models/ folders in ComfyUI's search paths
        prompt = world_student_graph(args.prompt, args.seed, args.steps, args.keep, args.dense_steps, args.frames, args.size)
        model_name = "USV World student (embedded)"
        how = f"{args.steps} steps, keep {args.keep:g}, no CFG"
    else:
        if world:
            unet, vae, model_name = os.path.basename(WORLD_DIT), os.path.basename(WORLD_VAE), "USV World teacher (embedded)"
        else:
            unet, vae, model_name = tiny_models.tiny_wan_t2v(0), tiny_models.tiny_wan_vae(0), "tiny random Wan 2.1 (stand-in)"
        prompt = teacher_graph(args, nodes, unet, vae, world)
        how = f"{args.steps} steps, keep {args.keep:g} after {args.dense_steps} dense, CFG {args.cfg:g}"

    start = time.perf_counter()
    result = runtime.run_workflow(prompt)
    seconds = time.perf_counter() - start

    import folder_paths

    saved = result.outputs["save"]["images"][0]
    src = os.path.join(folder_paths.get_output_directory(), saved.get("subfolder", ""), saved["filename"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    shutil.copy(src, args.out)
    video = result.output("decode")
    quality = ""
    if world:
        from usv_core.world import score

        quality = f", world score {score(video, args.prompt):.2f}"
    print(f"usv demo: {video.shape[0]} frames {args.size}x{args.size}, {how}, {seconds:.1f} s, model {model_name}, "
          f"prompt {args.prompt!r}{quality} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
