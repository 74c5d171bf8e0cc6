"""USV Sparse Attention on a tiny random LTX-Video model built through ComfyUI's own classes."""

import pytest
import torch

from harness import tiny_models


@pytest.fixture(scope="module")
def ltxv(comfy):
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.LTXV({"image_model": "ltxv", "num_layers": 2, "attention_head_dim": 64,
                                          "num_attention_heads": 2, "cross_attention_dim": 128,
                                          "caption_channels": 4096, "in_channels": 128})
    model = config.get_model({}, device=torch.device("cpu"))
    weights = tiny_models._fill(model.diffusion_model, seed=4)
    model.diffusion_model.load_state_dict(weights)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def sample(patcher, steps=3):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    mask = {"attention_mask": torch.ones(1, 8, dtype=torch.long)}  # as LTX-Video's text encoder sends it
    guider.set_conds([[tiny_models.text_conditioning(3), dict(mask)]], [[tiny_models.text_conditioning(4), dict(mask)]])
    guider.set_cfg(3.0)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps)
    latent = torch.zeros(1, 128, 5, 8, 8)  # grid (5, 8, 8): 2 x 2 x 2 cubes, edge cubes in time
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)


def test_model_info_names_ltxv(comfy_nodes, ltxv):
    text = comfy_nodes.NODE_CLASS_MAPPINGS["USVModelInfo"].execute(ltxv).result[0]
    assert "LTX-Video" in text and "heads: 2, head dim: 64" in text and "USV can patch it" in text


def test_keep_one_is_dense_and_keep_below_one_is_sparse(comfy_nodes, ltxv):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    dense = sample(ltxv)
    assert torch.equal(dense, sample(node.execute(ltxv, 1.0, 0, "", "4x4x4").result[0]))

    patched = node.execute(ltxv, 0.25, 1, "", "4x4x4").result[0]
    out = sample(patched)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)
    run = patched.model_options["transformer_options"]["usv_patch"].last_run
    sparse_at = {(s, b) for (s, b, p) in run.calls if p == "sparse"}
    assert sparse_at == {(s, b) for s in (1, 2) for b in (0, 1)}


def test_token_merge_refuses_ltxv_with_the_reason(comfy_nodes, ltxv):
    with pytest.raises(ValueError, match="supports Wan 2.1 / 2.2 models; this is LTX-Video"):
        comfy_nodes.NODE_CLASS_MAPPINGS["USVTokenMerge"].execute(ltxv, 0.5, 1, "", "keys")
