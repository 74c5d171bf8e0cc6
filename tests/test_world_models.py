"""The world model's definitions are Wan's: ComfyUI's own loaders read our safetensors files and its
forward passes equal ours; the shipped weights load through UNETLoader and VAELoader; the
USVWorldPrompt node gives Wan-shaped conditioning; a short generation runs through ComfyUI."""

import os

import pytest
import torch

from usv_core.world import weights
from usv_core.world.dit import WanDiT
from usv_core.world.vae import WanVAE, latent_norm

SHIPPED = all(os.path.exists(weights.default_path(f)) for f in (weights.DIT_FILE, weights.VAE_FILE, weights.TEXT_FILE))
needs_weights = pytest.mark.skipif(not SHIPPED, reason="models/ holds no trained world model yet (python3 -m usv_core.world.train)")


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def comfy_vae(sd):
    import comfy.sd

    vae = comfy.sd.VAE(sd=sd)
    assert type(vae.first_stage_model).__module__ == "comfy.ldm.wan.vae"
    return vae.first_stage_model.float()


def test_vae_matches_comfy_chunked_forward(comfy):
    """ComfyUI runs Wan's VAE chunk by chunk with a cache; ours runs whole clips: same numbers."""
    torch.manual_seed(0)
    ours = WanVAE(dim=4).eval()
    for p in ours.parameters():  # random weights far from the ones-and-zeros of a fresh model
        p.data.normal_(0, 0.3) if p.ndim > 1 else p.data.uniform_(0.5, 1.5)
    theirs = comfy_vae(ours.state_dict())
    x = torch.randn(1, 3, 9, 32, 32)
    z = torch.randn(1, 16, 3, 4, 4)
    with torch.no_grad():
        assert rel_err(ours.encode(x), theirs.encode(x)) < 1e-5
        assert rel_err(ours.decode(z), theirs.decode(z)) < 1e-5


def test_dit_matches_comfy_wan(comfy):
    import comfy.sd

    torch.manual_seed(0)
    ours = WanDiT(dim=256, ffn_dim=256, num_layers=2).eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.05)
    patcher = comfy.sd.load_diffusion_model_state_dict(ours.state_dict())
    assert type(patcher.model).__name__ == "WAN21" and type(patcher.model.model_config).__name__ == "WAN21_T2V"
    theirs = patcher.model.diffusion_model.float()
    assert theirs.num_heads == 2 and len(theirs.blocks) == 2
    x, t, ctx = torch.randn(2, 16, 3, 6, 8), torch.tensor([999.0, 250.0]), torch.randn(2, 16, 4096)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx), theirs(x, t, ctx)) < 1e-5


@needs_weights
def test_shipped_weights_load_through_comfy_loaders(comfy):
    nodes = comfy
    import comfy.model_management
    import folder_paths

    assert "usv_world_dit.safetensors" in folder_paths.get_filename_list("diffusion_models")
    assert "usv_world_vae.safetensors" in folder_paths.get_filename_list("vae")
    model = nodes.UNETLoader().load_unet("usv_world_dit.safetensors", "default")[0]
    vae = nodes.VAELoader().load_vae("usv_world_vae.safetensors")[0]
    assert type(model.model.model_config).__name__ == "WAN21_T2V"
    assert float(model.model.model_sampling.shift) == 8.0
    # the teacher the sparsification is measured on: enough layers and heads to allocate over
    assert len(model.model.diffusion_model.blocks) >= 8 and model.model.diffusion_model.num_heads >= 2
    shipped = [weights.default_path(f) for f in (weights.DIT_FILE, weights.VAE_FILE, weights.TEXT_FILE)]
    assert sum(os.path.getsize(f) for f in shipped) <= 48 * 10**6

    ours = weights.load_dit()
    theirs = model.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(1, 16, 3, 8, 8, generator=g), torch.tensor([700.0]), torch.randn(1, 16, 4096, generator=g)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx), theirs.float()(x, t, ctx)) < 1e-4

    our_vae = weights.load_vae()
    frames = torch.rand(5, 32, 32, 3, generator=g)
    with torch.no_grad():
        z_theirs = vae.encode(frames)  # (1, 16, 2, 4, 4), raw latents
        z_ours = our_vae.encode(frames.permute(3, 0, 1, 2)[None] * 2 - 1)
        assert rel_err(z_ours, z_theirs.float()) < 1e-3
        img = vae.decode(z_theirs)  # (1, 5, 32, 32, 3) in [0, 1]
        ours_img = ((our_vae.decode(z_ours).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
        assert rel_err(ours_img, img.reshape(ours_img.shape).float()) < 1e-3


@needs_weights
def test_world_prompt_node(comfy, caplog):
    node = comfy.NODE_CLASS_MAPPINGS["USVWorldPrompt"]
    cond = node.execute("a red circle and a blue square").result[0]
    assert isinstance(cond, list) and len(cond) == 1 and cond[0][1] == {}
    assert cond[0][0].shape == (1, 16, 4096) and cond[0][0].dtype == torch.float32
    empty = node.execute("").result[0][0][0]
    assert torch.equal(empty, weights.load_text().encode("").float())
    assert not torch.equal(empty, cond[0][0])
    with caplog.at_level("WARNING", logger="usv.world"):
        odd = node.execute("a red zebra circle\nand a blue square").result[0][0][0]
    assert torch.equal(odd, cond[0][0])
    assert sum("zebra" in r.getMessage() for r in caplog.records) == 1


@needs_weights
def test_world_generation_through_comfy(comfy):
    from harness import runtime

    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "usv_world_dit.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "USVWorldPrompt", "inputs": {"prompt": "a red circle and a blue square"}},
        "3": {"class_type": "USVWorldPrompt", "inputs": {"prompt": ""}},
        "4": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
                                                   "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": "usv_world_vae.safetensors"}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "PreviewImage", "inputs": {"images": ["7", 0]}},
    }
    result = runtime.run_workflow(prompt)
    assert len(result.outputs["8"]["images"]) == 5


@needs_weights
def test_comfy_ksampler_equals_our_sampler(comfy):
    """KSampler(euler, simple, CFG) on the shipped weights computes what usv_core.world.sampling
    computes, so teacher numbers measured with our sampler on the GPU hold for ComfyUI's graph."""
    nodes = comfy  # the fixture; the import below rebinds the name to ComfyUI's package
    import comfy.sample

    from usv_core.world.sampling import sample

    model = nodes.UNETLoader().load_unet("usv_world_dit.safetensors", "default")[0]
    prompt = nodes.NODE_CLASS_MAPPINGS["USVWorldPrompt"]
    pos, neg = prompt.execute("a green triangle and a white square").result[0], prompt.execute("").result[0]
    latent = {"samples": torch.zeros(1, 16, 2, 4, 4)}
    theirs = nodes.common_ksampler(model, 7, 4, 5.0, "euler", "simple", pos, neg, latent)[0]["samples"]
    noise = comfy.sample.prepare_noise(latent["samples"], 7)
    with torch.no_grad():
        ours = latent_norm(sample(weights.load_dit(), pos[0][0], neg[0][0], noise, steps=4, cfg=5.0), inverse=True)
    assert rel_err(ours, theirs.float()) < 1e-3


def load_demo():
    import importlib.util

    spec = importlib.util.spec_from_file_location("usv_demo", os.path.join(os.path.dirname(__file__), "..", "scripts", "demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


@needs_weights
def test_shipped_student_loads_and_matches_the_teacher_layout(comfy):
    """The few-step student goes through UNETLoader as the teacher does, and fits the budget of
    shipped files (60 MB with it)."""
    nodes = comfy
    import folder_paths

    assert "usv_world_student.safetensors" in folder_paths.get_filename_list("diffusion_models")
    student = nodes.UNETLoader().load_unet("usv_world_student.safetensors", "default")[0]
    teacher = nodes.UNETLoader().load_unet("usv_world_dit.safetensors", "default")[0]
    assert type(student.model.model_config).__name__ == "WAN21_T2V"
    s, t = student.model.diffusion_model.state_dict(), teacher.model.diffusion_model.state_dict()
    assert s.keys() == t.keys() and any(not torch.equal(s[k], t[k]) for k in s)  # trained, not a copy
    shipped = [weights.default_path(f) for f in (weights.DIT_FILE, weights.VAE_FILE, weights.TEXT_FILE)]
    shipped.append(os.path.join(weights.MODELS_DIR, "diffusion_models", "usv_world_student.safetensors"))
    assert sum(os.path.getsize(f) for f in shipped) <= 60 * 10**6


@needs_weights
def test_readme_main_command_generates_with_the_student(comfy, tmp_path, capsys):
    """scripts/demo.py (what ./scripts/demo.sh runs) by default: the student through USV DMD Sigmas,
    USV DMD Sampler and USV Sparse Attention in ComfyUI's executor, small enough for the suite."""
    demo = load_demo()
    out = tmp_path / "demo.mp4"
    assert demo.main(["--size", "64", "--frames", "5", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("usv demo: 5 frames 64x64, 3 steps, keep 0.2, no CFG, ") and " s, model USV World student" in line
    assert "world score " in line and out.stat().st_size > 1000
    # --steps other than the trained 3: evenly spaced timesteps over the same range
    assert demo.main(["--size", "64", "--frames", "5", "--steps", "2", "--out", str(out)]) == 0
    assert ", 2 steps, " in capsys.readouterr().out.strip().splitlines()[-1]
    assert demo.student_sigmas(4)["timesteps"] == "1000, 841, 681, 522"


@needs_weights
def test_readme_main_command_runs_the_teacher(comfy, tmp_path, capsys):
    demo = load_demo()
    out = tmp_path / "demo.mp4"
    assert demo.main(["--teacher", "--size", "64", "--frames", "5", "--steps", "3", "--dense-steps", "1", "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert ", 3 steps, keep 0.5 after 1 dense, CFG 5, " in line and "model USV World teacher (embedded)" in line
    assert "world score " in line and out.stat().st_size > 1000
