"""Writes the shareable workflows in workflows/ from API-format graphs, so that their widget order
always matches the nodes (tests/test_workflows.py checks and runs every file there).

.venv/bin/python scripts/make_workflows.py
"""

import json
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "workflows")

WORLD_NOTES = """## USV World: text to video on the embedded model

Runs on a CPU in minutes with the pack's own tiny Wan 2.1 (models/ of the pack, listed in the
loaders). Prompts name 1-3 objects: a colour (red, green, blue, yellow, white, purple) and a shape
(circle, square, triangle). USV Sparse Attention and USV Token Merge sit between the loader and the
sampler. On the v1 model (bench/world.md, 24 prompts on an H200) keep 0.5 after 15 dense steps of
50 matched the dense world score (0.303); token merging cost quality there (ratio 0.25 alone:
0.212): set ratio to 0 for the teacher's quality, keep to 1 as well for the dense teacher. For
seconds instead of minutes, usv_world_student runs the distilled 3-step student."""

FASTWAN_NOTES = """## FastWan 2.1 T2V 1.3B with USV: 3 steps, sparse attention with its trained gate

Files: diffusion_models/FastWan2.1-T2V-1.3B_bf16.safetensors (FastVideo's FastWan2.1-T2V-1.3B,
converted to ComfyUI's layout), text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors,
vae/wan_2.1_vae.safetensors. FastWan was distilled with VSA at 80% sparsity: keep 0.2 on every
step, and gate_weights names the same checkpoint so that its to_gate_compress weights drive the
coarse branch. USV DMD Sigmas (fastwan-3step) and USV DMD Sampler do the 3 steps, no CFG. USV VAE
Decode is ComfyUI's VAE Decode up to bf16 rounding, faster on the GPU (on the CPU the whole clip at once)."""


STUDENT_NOTES = """## USV World student: 3 steps, sparse attention, no CFG

The pack's few-step student of its USV World teacher, distilled with sparse DMD2 (usv_core.distill)
with USV Sparse Attention at keep 0.2 on every step of fastwan-3step: keep 0.2, dense_steps 0 and
blocks "cubes" are the settings it was trained at (on packed blocks it scores 0.378 instead). USV
DMD Sigmas and USV DMD Sampler run the 3 steps; BasicGuider means no CFG (one forward per step). World score on 64 held-out prompts at 17 frames (bench/world.md):
0.416 +- 0.042, against 0.666 +- 0.043 for the dense teacher at 50 steps with CFG 5 (100 forwards);
the same 3 steps on the undistilled teacher score 0.025. Token merging costs this small model more
than it saves: leave it out here."""


def world_student_prompt() -> dict:
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from demo import world_student_graph

    g = world_student_graph("a red circle and a blue square")
    g["save"]["inputs"].update(filename_prefix="usv_world_student", format="auto", codec="auto")
    return g


def world_prompt() -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": "usv_world_dit.safetensors", "weight_dtype": "default"}},
        "usv": {"class_type": "USVSparseAttention", "inputs": {"model": ["unet", 0], "keep": 0.5, "dense_steps": 15,
                                                               "dense_blocks": "", "cube": "4x4x4", "gate_weights": "none"}},
        "merge": {"class_type": "USVTokenMerge", "inputs": {"model": ["usv", 0], "ratio": 0.25, "dense_steps": 15,
                                                            "blocks": "", "metric": "keys"}},
        "pos": {"class_type": "USVWorldPrompt", "inputs": {"prompt": "a red circle and a blue square"}},
        "neg": {"class_type": "USVWorldPrompt", "inputs": {"prompt": ""}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 256, "height": 256, "length": 33, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["merge", 0], "seed": 0, "steps": 50, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0], "denoise": 1.0}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "usv_world_vae.safetensors"}},
        "decode": {"class_type": "USVVAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["vae", 0]}},
        "video": {"class_type": "CreateVideo", "inputs": {"images": ["decode", 0], "fps": 16.0}},
        "save": {"class_type": "SaveVideo", "inputs": {"video": ["video", 0], "filename_prefix": "usv_world",
                                                       "format": "auto", "codec": "auto"}},
    }


POLICY_NOTES = """## USV World with the policy: one budget, and a report of where it went

USV Policy hands one budget (the share of dense work each step keeps) out over layers and heads
by how spread their attention is; USV Sparse Attention and USV Token Merge take it through their
policy input: their keep becomes the least any head keeps, their ratio the most any layer merges.
USV Report runs after sampling and shows entropy, keep and tokens kept per layer and step, with the
estimated speedup. On the v2 model (docs/policy.md; H200, 24 prompts, 50 steps, 15 dense) budget
0.7 scored 0.626 against the dense 0.693; lower budgets cost visible quality. keep 0.1 here: a
floor of 0.1 instead of 0.02 lifted the entropy policy by 0.03 at budget 0.7 and both rules by
0.15 at budget 0.5 (CPU, 20 steps)."""


def world_policy_prompt() -> dict:
    g = world_prompt()
    g["policy"] = {"class_type": "USVPolicy", "inputs": {"budget": 0.7, "gamma": 1.0, "refresh": 2,
                                                         "mode": "entropy", "early": 0.0}}
    g["usv"]["inputs"].update(keep=0.1, policy=["policy", 0])
    g["merge"]["inputs"].update(policy=["policy", 0])
    g["report"] = {"class_type": "USVReport", "inputs": {"model": ["merge", 0], "latent": ["sample", 0]}}
    g["heatmap"] = {"class_type": "PreviewImage", "inputs": {"images": ["report", 0]}}
    g["save"]["inputs"]["filename_prefix"] = "usv_world_policy"
    return g


def fastwan_prompt(nodes) -> dict:
    from harness.ui_workflow import ui_to_api

    with open(os.path.join(OUT, "fastwan_t2v_1.3b_dmd.json")) as f:
        prompt = ui_to_api(nodes, json.load(f))
    unet = next(k for k, v in prompt.items() if v["class_type"] == "UNETLoader")
    name = prompt[unet]["inputs"]["unet_name"]
    prompt["usv"] = {"class_type": "USVSparseAttention", "inputs": {
        "model": [unet, 0], "keep": 0.2, "dense_steps": 0, "dense_blocks": "", "cube": "4x4x4", "gate_weights": name}}
    for key, v in prompt.items():
        if key != "usv":
            for inp, value in v["inputs"].items():
                if value == [unet, 0]:
                    v["inputs"][inp] = ["usv", 0]
    return prompt


WAN22_NOTES = """## Wan 2.2 T2V A14B with USV on both experts: one policy sets both

Files: diffusion_models/wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors and
wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors, text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors,
vae/wan_2.1_vae.safetensors (ComfyUI's Wan 2.2 repackaged files). As in ComfyUI's Wan 2.2 template,
the high-noise expert samples steps 0-9 of 20 and hands its noisy latent to the low-noise expert
for steps 10-20 (two KSamplerAdvanced). Each expert is a separate model, so each gets its own USV
Sparse Attention; the one USV Policy feeds both, and its budget (share of dense work per step) is
the setting for the whole run. keep on the two nodes is only the least a head keeps. The high-noise
expert keeps its first step dense (it lays out the composition); the low-noise expert starts from
that composition, so its steps (counted from its own first step) are all sparse. A USV Report per
expert shows where its budget went."""


def wan22_prompt() -> dict:
    def expert(name, unet, dense_steps):
        return {
            f"unet_{name}": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": "default"}},
            f"shift_{name}": {"class_type": "ModelSamplingSD3", "inputs": {"model": [f"unet_{name}", 0], "shift": 8.0}},
            f"usv_{name}": {"class_type": "USVSparseAttention", "inputs": {
                "model": [f"shift_{name}", 0], "keep": 0.02, "dense_steps": dense_steps, "dense_blocks": "",
                "cube": "4x4x4", "gate_weights": "none", "policy": ["policy", 0]}},
        }

    def sampler(name, latent, add_noise, start, end, leftover):
        return {"class_type": "KSamplerAdvanced", "inputs": {
            "model": [f"usv_{name}", 0], "add_noise": add_noise, "noise_seed": 0, "steps": 20, "cfg": 3.5,
            "sampler_name": "euler", "scheduler": "simple", "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": latent, "start_at_step": start, "end_at_step": end,
            "return_with_leftover_noise": leftover}}

    return {
        "policy": {"class_type": "USVPolicy", "inputs": {"budget": 0.5, "gamma": 1.0, "refresh": 2,
                                                         "mode": "entropy", "early": 0.0}},
        **expert("high", "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", 1),
        **expert("low", "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", 0),
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                                        "type": "wan", "device": "default"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": (
            "a red fox trotting through fresh snow in a birch forest at sunrise, soft light, slow tracking shot")}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["clip", 0], "text": (
            "static, blurry details, low quality, JPEG artifacts, deformed, subtitles, overexposed")}},
        "latent": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 640, "height": 640, "length": 81,
                                                                      "batch_size": 1}},
        "sample_high": sampler("high", ["latent", 0], "enable", 0, 10, "enable"),
        "sample_low": sampler("low", ["sample_high", 0], "disable", 10, 10000, "disable"),
        "report_high": {"class_type": "USVReport", "inputs": {"model": ["usv_high", 0], "latent": ["sample_high", 0]}},
        "report_low": {"class_type": "USVReport", "inputs": {"model": ["usv_low", 0], "latent": ["sample_low", 0]}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}},
        "decode": {"class_type": "USVVAEDecode", "inputs": {"samples": ["sample_low", 0], "vae": ["vae", 0]}},
        "video": {"class_type": "CreateVideo", "inputs": {"images": ["decode", 0], "fps": 16.0}},
        "save": {"class_type": "SaveVideo", "inputs": {"video": ["video", 0], "filename_prefix": "video/wan22_usv",
                                                       "format": "auto", "codec": "auto"}},
    }


def main() -> int:
    from harness import runtime
    from harness.ui_workflow import api_to_ui

    logging.disable(logging.WARNING)
    nodes = runtime.boot()
    logging.disable(logging.NOTSET)
    files = {
        "usv_world_t2v.json": api_to_ui(nodes, world_prompt(), WORLD_NOTES),
        "usv_world_policy.json": api_to_ui(nodes, world_policy_prompt(), POLICY_NOTES),
        "usv_world_student.json": api_to_ui(nodes, world_student_prompt(), STUDENT_NOTES),
        "fastwan_t2v_1.3b_usv.json": api_to_ui(nodes, fastwan_prompt(nodes), FASTWAN_NOTES),
        "wan22_t2v_two_experts_usv.json": api_to_ui(nodes, wan22_prompt(), WAN22_NOTES),
    }
    for name, wf in files.items():
        with open(os.path.join(OUT, name), "w") as f:
            json.dump(wf, f, indent=1)
            f.write("\n")
        print("wrote", os.path.join("workflows", name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
