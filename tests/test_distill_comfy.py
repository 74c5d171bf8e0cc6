"""The distilled student in ComfyUI: the exported full model loads through UNETLoader as a Wan 2.1
T2V; with USV Sparse Attention and USV Token Merge at the trained settings ComfyUI computes what the
student computed in training; the LoRA export through LoraLoaderModelOnly gives the same model; a
short video samples through USV DMD Sigmas and USV DMD Sampler in the executor."""

import os
import shutil

import pytest
import torch

from usv_core.distill import Sparsity
from usv_core.distill.config import from_args
from usv_core.distill.dist import Dist
from usv_core.distill.export import save_full
from usv_core.distill.loop import LORA_FILE, STUDENT_FILE, Trainer
from usv_core.distill.models import read_wan_state, wan_from_state
from usv_core.distill.student import SparseWanDiT

KEEP, MERGE = 0.25, 0.5
NAME = "usv_test_distilled_student.safetensors"
TEACHER = "usv_test_distill_teacher.safetensors"
LORA = "usv_test_distilled_student_lora.safetensors"
LATENT = (1, 16, 2, 16, 16)  # 5 frames at 128 x 128: four 4x4x4 cubes of tokens


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # two shared cores: more threads only contend on tensors this small
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def exported(comfy, tmp_path_factory, one_thread):
    """A tiny student trained two steps and exported, in ComfyUI's model folders."""
    from harness import runtime

    out = tmp_path_factory.mktemp("distill")
    cfg = from_args(["--out", str(out), "--tiny", "--steps", "2", "--keep", str(KEEP), "--merge", str(MERGE),
                     "--lr", "1e-3", "--export-rank", "128"])
    trainer = Trainer(cfg, Dist())
    trainer.run(say=lambda _msg: None)
    for src, kind, name in ((STUDENT_FILE, "diffusion_models", NAME), (LORA_FILE, "loras", LORA)):
        dst = runtime.model_path(kind, name)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(out / src, dst)
    save_full(trainer.teacher_sd, runtime.model_path("diffusion_models", TEACHER))
    return runtime.model_path("diffusion_models", NAME)


class FixedNoise:
    """A NOISE input (what RandomNoise gives the sampler) holding one given tensor."""

    seed = 0

    def __init__(self, noise):
        self.noise = noise

    def generate_noise(self, input_latent):
        return self.noise.clone()


def one_step_x0(comfy, model, noise, cond):
    """The model's x0 at sigma 1 through SamplerCustomAdvanced: exactly one model call."""
    nodes = comfy.NODE_CLASS_MAPPINGS
    guider = nodes["BasicGuider"]().execute(model, [[cond, {}]]).result[0]
    sampler = nodes["USVDMDSampler"]().execute("stochastic", 0).result[0]
    latent = {"samples": torch.zeros(LATENT)}
    return nodes["SamplerCustomAdvanced"]().execute(FixedNoise(noise), guider, sampler, torch.tensor([1.0, 0.0]), latent).result[0]["samples"]


def inputs():
    g = torch.Generator().manual_seed(7)
    return torch.randn(LATENT, generator=g), torch.randn(1, 8, 4096, generator=g)


def usv(comfy, model, dense_steps=0):
    nodes = comfy.NODE_CLASS_MAPPINGS
    # students are distilled on one block per cube (the distill default): the node is told so
    model = nodes["USVSparseAttention"]().execute(model, KEEP, dense_steps, "", "4x4x4", blocks="cubes").result[0]
    return nodes["USVTokenMerge"]().execute(model, MERGE, dense_steps, "", "keys").result[0]


def test_exported_student_loads_as_wan_and_runs_as_it_was_trained(comfy, exported):
    model = comfy.UNETLoader().load_unet(NAME, "default")[0]
    assert type(model.model).__name__ == "WAN21" and type(model.model.model_config).__name__ == "WAN21_T2V"
    noise, cond = inputs()
    ours = wan_from_state(read_wan_state(exported), cls=SparseWanDiT).eval()
    latent_format = model.get_model_object("latent_format")
    with torch.no_grad():
        t = torch.tensor([1000.0])
        dense = latent_format.process_out(noise - ours(noise, t, cond))
        trained = latent_format.process_out(noise - ours(noise, t, cond, Sparsity(keep=KEEP, merge=MERGE)))
    theirs_dense = one_step_x0(comfy, model, noise, cond)
    theirs_sparse = one_step_x0(comfy, usv(comfy, model), noise, cond)
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(theirs_dense, dense) < 1e-4
    assert rel(theirs_sparse, trained) < 1e-4  # the nodes run the sparsity the student was trained with
    assert rel(theirs_sparse, dense) > 1e-3


def test_lora_export_through_lora_loader_model_only(comfy, exported):
    full = comfy.UNETLoader().load_unet(NAME, "default")[0]
    teacher = comfy.UNETLoader().load_unet(TEACHER, "default")[0]
    with_lora = comfy.NODE_CLASS_MAPPINGS["LoraLoaderModelOnly"]().load_lora_model_only(teacher, LORA, 1.0)[0]
    noise, cond = inputs()
    a, b, base = (one_step_x0(comfy, m, noise, cond) for m in (with_lora, full, teacher))
    assert float((a - b).norm() / (b - base).norm()) < 0.05  # within bf16 rounding of what the student changed
    assert float((b - base).norm() / b.norm()) > 1e-4  # and it did change something


def test_student_samples_a_video_through_usv_dmd_sampler(comfy, exported, tiny_vae):
    from harness import runtime

    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": NAME, "weight_dtype": "default"}},
        "2": {"class_type": "USVSparseAttention", "inputs": {"model": ["1", 0], "keep": KEEP, "dense_steps": 0, "dense_blocks": "", "cube": "4x4x4"}},
        "3": {"class_type": "USVTokenMerge", "inputs": {"model": ["2", 0], "ratio": MERGE, "dense_steps": 0, "blocks": "", "metric": "keys"}},
        "4": {"class_type": "USVWorldPrompt", "inputs": {"prompt": "a red circle and a blue square"}},
        "5": {"class_type": "BasicGuider", "inputs": {"model": ["3", 0], "conditioning": ["4", 0]}},
        "6": {"class_type": "USVDMDSigmas", "inputs": {"model": ["3", 0], "preset": "fastwan-3step", "timesteps": "1000, 750, 500, 250", "shift": 5.0}},
        "7": {"class_type": "USVDMDSampler", "inputs": {"mode": "stochastic", "noise_seed": 0}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "9": {"class_type": "EmptyHunyuanLatentVideo", "inputs": {"width": 128, "height": 128, "length": 5, "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["5", 0], "sampler": ["7", 0], "sigmas": ["6", 0], "latent_image": ["9", 0]}},
        "11": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_vae}},
        "12": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["11", 0]}},
    }
    result = runtime.run_workflow(prompt, outputs=("12", "6"))
    frames = result.output("12")
    assert tuple(frames.shape) == (5, 128, 128, 3) and torch.isfinite(frames).all()
    assert result.output("6").tolist() == pytest.approx([1.0, 0.757, 0.522, 0.0])
