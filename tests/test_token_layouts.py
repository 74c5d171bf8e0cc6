"""Wan calls whose tokens are not a plain grid: reference latents before it (ref_conv), in-context
latents after it (context_latents, ComfyUI 0.25+). The grid is served sparse, the tokens around
it densely; a call whose tokens USV cannot place runs dense and the log says so once."""

import logging

import pytest
import torch
from safetensors.torch import save_file

from harness import runtime, tiny_models

GRID_LATENT = (1, 16, 3, 16, 16)  # grid (3, 8, 8): 1 x 2 x 2 cubes of 4x4x4


@pytest.fixture(scope="module")
def wan_ref(comfy_nodes):
    """A tiny Wan 2.1 whose checkpoint has ref_conv, loaded by UNETLoader."""
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    name = "tiny_wan21_refconv_s5.safetensors"
    model = WanModel(model_type="t2v", dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16,
                     text_dim=tiny_models.TEXT_DIM, in_dim_ref_conv=16, operations=comfy.ops.disable_weight_init,
                     device="cpu", dtype=torch.float32)
    save_file(tiny_models._fill(model, 5), runtime.model_path("diffusion_models", name))
    return comfy_nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(name, "default")[0]


def sample(model, cond_extra, steps=2):
    return tiny_models.sample_wan(model, steps, cond_extra, GRID_LATENT)


def sparse(comfy_nodes, model, keep):
    return comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"].execute(model, keep, 0, "", "4x4x4").result[0]


def paths(model):
    return model.model_options["transformer_options"]["usv_patch"].last_run.paths()


def latent(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def check_grid_served(comfy_nodes, model, extra):
    dense = sample(model, extra)
    # every cube kept: the sparse path, with the tokens moved around the grid and back, must be exact
    full = sparse(comfy_nodes, model, 0.999)
    assert torch.allclose(sample(full, extra), dense, atol=1e-4, rtol=1e-4)
    assert paths(full) == {"sparse": 2 * 2, "declined": 2 * 2}  # self-attention served, cross-attention handed on
    quarter = sparse(comfy_nodes, model, 0.25)
    out = sample(quarter, extra)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)
    assert paths(quarter)["sparse"] == 2 * 2


def test_reference_latent_before_the_grid_is_served(comfy_nodes, wan_ref):
    check_grid_served(comfy_nodes, wan_ref, {"reference_latents": [latent((1, 16, 1, 16, 16), 3)]})


def test_context_latents_after_the_grid_are_served(comfy_nodes, wan4):
    import inspect

    from comfy.ldm.wan.model import WanModel

    if "context_latents" not in inspect.getsource(WanModel.forward_orig):
        pytest.skip("this ComfyUI's Wan has no context_latents (0.25+)")
    wan = comfy_nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(tiny_models.tiny_wan_t2v(0), "default")[0]
    check_grid_served(comfy_nodes, wan, {"context_latents": [latent((1, 16, 2, 8, 8), 4)]})


def test_tokens_the_layout_cannot_place_run_dense_and_say_so_once(comfy_nodes, tiny_wan, caplog):
    """Another pack's block patch that appends tokens (register tokens, say) before the block."""
    wan = comfy_nodes.NODE_CLASS_MAPPINGS["UNETLoader"]().load_unet(tiny_wan, "default")[0]

    def with_registers(args, extra):
        img = args["img"]
        registers = img[:, :4]
        out = extra["original_block"]({**args, "img": torch.cat([img, registers], 1),
                                       "pe": torch.cat([args["pe"], args["pe"][:, :4]], 1)})
        return {**out, "img": out["img"][:, :img.shape[1]]}

    other = wan.clone()
    for block in range(2):
        other.set_model_patch_replace(with_registers, "dit", "double_block", block)
    dense = sample(other, {})
    patched = sparse(comfy_nodes, other, 0.25)
    with caplog.at_level(logging.WARNING, logger="usv"):
        out = sample(patched, {})
    assert torch.equal(out, dense)
    assert paths(patched) == {"dense:tokens": 2 * 2, "declined": 2 * 2}
    warnings = [r.getMessage() for r in caplog.records if "self-attention saw" in r.getMessage()]
    assert len(warnings) == 1 and "196 tokens where the video layout has 192" in warnings[0], warnings


def test_scail_reference_frames_and_pose_tokens_are_served(comfy_nodes):
    import comfy.model_patcher
    import comfy.supported_models

    if not hasattr(comfy.supported_models, "WAN21_SCAIL"):
        pytest.skip("this ComfyUI has no SCAIL (Wan 2.1 pose-driven)")
    config = {"image_model": "wan2.1", "model_type": "scail", "patch_size": (1, 2, 2), "dim": 256, "ffn_dim": 512,
              "freq_dim": 256, "in_dim": 20, "num_heads": 2, "num_layers": 2, "out_dim": 16,
              "text_dim": tiny_models.TEXT_DIM, "eps": 1e-6}
    model = comfy.supported_models.WAN21_SCAIL(config).get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(tiny_models._fill(model.diffusion_model, 6))
    cpu = torch.device("cpu")
    scail = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    # the reference frame joins the grid in time; the half-resolution pose video follows it
    extra = {"reference_latents": [latent((1, 16, 1, 16, 16), 7)], "pose_video_latent": latent((1, 16, 3, 8, 8), 8)}
    dense = sample(scail, extra)
    full = sparse(comfy_nodes, scail, 0.999)
    assert torch.allclose(sample(full, extra), dense, atol=1e-4, rtol=1e-4)
    assert paths(full)["sparse"] == 2 * 2 and "dense:tokens" not in paths(full)
