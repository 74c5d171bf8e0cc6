"""The main job: generate a video through the USV nodes in the real ComfyUI.

With no GPU and no weights of your own it uses the embedded USV World model (models/) and
prints the video's world score; without those files a tiny random Wan stands in and the video
is noise-like by design.
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
WORLD_VAE = os.path.join(ROOT, "models", "vae", "usv_world_vae.safetensors")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompt", default="a red circle and a blue square", help="what to generate")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    # keep 0.5 after a dense 30% of the steps matched the dense teacher's world score (bench/world.md)
    p.add_argument("--keep", type=float, default=0.5, help="USV Sparse Attention: share of key cubes kept")
    p.add_argument("--dense-steps", type=int, default=6, help="USV Sparse Attention: first steps run dense")
    p.add_argument("--frames", type=int, default=17, help="video length (4k + 1 frames)")
    p.add_argument("--size", type=int, default=256, help="width and height in pixels")
    p.add_argument("--out", default=os.path.join("output", "usv_demo.mp4"), help="where the video goes")
    return p.parse_args(argv)


def build_prompt(args, nodes, unet: str, vae: str, world: bool) -> dict:
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
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}}
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
    if world:
        # the pack lists its models/ folders in ComfyUI's search paths
        unet, vae, model_name = os.path.basename(WORLD_DIT), os.path.basename(WORLD_VAE), "USV World (embedded)"
    else:
        unet, vae, model_name = tiny_models.tiny_wan_t2v(0), tiny_models.tiny_wan_vae(0), "tiny random Wan 2.1 (stand-in)"
    prompt = build_prompt(args, nodes, unet, vae, world)

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
    print(f"usv demo: {video.shape[0]} frames {args.size}x{args.size}, {seconds:.1f} s, model {model_name}, "
          f"prompt {args.prompt!r}{quality} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
