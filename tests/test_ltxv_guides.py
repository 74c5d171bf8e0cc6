"""USV Sparse Attention on the tiny random LTX-Video with keyframe guides, as LTXVAddGuide builds them:
the guide's latent frame is appended to the video latent, its token positions go into the
conditioning as keyframe_idxs, and its part of the denoise mask is negative where the guide is
dilated (IC-LoRA's small grid). ComfyUI 0.8+ then drops those guide tokens (LTXVModel's grid_mask):
USV keeps the video frames as its grid and attends the surviving guide tokens densely after it."""

import inspect
import logging

import pytest
import torch

from harness import tiny_models

VIDEO = (1, 128, 5, 8, 8)  # grid (5, 8, 8): 2 x 2 x 2 cubes of 4x4x4, edge cubes in time
GUIDE_FRAME_IDX = 9  # the pixel frame the guide conditions (latent frame 1)
DILATION = 2  # guide latent dilated by 2: 1 token in 4 survives
KEPT_GUIDE_TOKENS = (8 // DILATION) ** 2
WARNING = "USV: LTX-Video: keyframe guides drop tokens inside the video frames"


@pytest.fixture(scope="module")
def ltxv(comfy):
    return tiny_models.tiny_ltxv(seed=4)


def drops_tokens() -> bool:
    """Whether this release's LTXVModel drops the tokens a negative denoise mask marks (0.8+)."""
    from comfy.ldm.lightricks.model import LTXVModel

    return "denoise_mask" in inspect.signature(LTXVModel._forward).parameters


def guided_inputs(model_patcher):
    """(latent, denoise mask, keyframe_idxs) as LTXVAddGuide leaves them for one dilated guide frame."""
    from comfy.ldm.lightricks.symmetric_patchifier import latent_to_pixel_coords

    dm = model_patcher.model.diffusion_model
    gen = torch.Generator().manual_seed(11)
    guide = torch.zeros(1, 128, 1, 8, 8)
    guide[..., ::DILATION, ::DILATION] = torch.randn(1, 128, 1, 8 // DILATION, 8 // DILATION, generator=gen)
    _, latent_coords = dm.patchifier.patchify(guide)
    keyframe_idxs = latent_to_pixel_coords(latent_coords, dm.vae_scale_factors, causal_fix=True)
    keyframe_idxs[:, 0] += GUIDE_FRAME_IDX
    guide_mask = torch.full((1, 1, 1, 8, 8), -1.0)  # dilated positions: dropped
    guide_mask[..., ::DILATION, ::DILATION] = 0.0  # strength 1: kept, not denoised
    latent = torch.cat([torch.zeros(VIDEO), guide], dim=2)
    mask = torch.cat([torch.ones(1, 1, *VIDEO[2:]), guide_mask], dim=2)
    return latent, mask, keyframe_idxs


def sample(patcher, latent, mask, keyframe_idxs, steps=3):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    extra = {"attention_mask": torch.ones(1, 8, dtype=torch.long), "keyframe_idxs": keyframe_idxs}
    guider.set_conds([[tiny_models.text_conditioning(3), dict(extra)]], [[tiny_models.text_conditioning(4), dict(extra)]])
    guider.set_cfg(3.0)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, denoise_mask=mask, seed=0)


def last_run(patched):
    return patched.model_options["transformer_options"]["usv_patch"].last_run


def sparse_calls(run):
    return {(s, b) for (s, b, p) in run.calls if p == "sparse"}


@pytest.fixture(scope="module")
def guided(ltxv):
    latent, mask, keyframe_idxs = guided_inputs(ltxv)
    return latent, mask, keyframe_idxs, sample(ltxv, latent, mask, keyframe_idxs)


def test_all_cubes_kept_matches_dense_with_guide_tokens_after_the_grid(comfy_nodes, ltxv, guided):
    latent, mask, keyframe_idxs, dense = guided
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    patched = node.execute(ltxv, 0.999, 0, "", "4x4x4").result[0]  # every cube kept, still the sparse path
    out = sample(patched, latent, mask, keyframe_idxs)
    run = last_run(patched)
    assert sparse_calls(run) == {(s, b) for s in range(3) for b in range(2)}
    assert run.paths()["sparse"] == 6 and not any(p.startswith("dense") for p in run.paths())
    if drops_tokens():
        assert run.grid == VIDEO[2:]  # the video frames; the 16 surviving guide tokens follow densely
    else:
        assert run.grid == (VIDEO[2] + 1,) + VIDEO[3:]  # no tokens dropped: the guide frame is a grid frame
    assert (out - dense).abs().max() < 1e-4


def test_keep_quarter_runs_sparse_with_guides(comfy_nodes, ltxv, guided):
    latent, mask, keyframe_idxs, dense = guided
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    patched = node.execute(ltxv, 0.25, 1, "", "4x4x4").result[0]
    out = sample(patched, latent, mask, keyframe_idxs)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)
    run = last_run(patched)
    assert sparse_calls(run) == {(s, b) for s in (1, 2) for b in (0, 1)}
    assert run.grid == (VIDEO[2:] if drops_tokens() else (VIDEO[2] + 1,) + VIDEO[3:])


def test_tokens_dropped_inside_the_video_run_dense_and_say_why_once(comfy_nodes, ltxv, caplog):
    if not drops_tokens():
        pytest.skip("this ComfyUI's LTXVModel never drops tokens (no denoise_mask in _forward before 0.8)")
    latent, mask, keyframe_idxs = guided_inputs(ltxv)
    mask = mask.clone()
    mask[:, :, 2, :4, :] = -1.0  # half of video frame 2 dropped
    dense = sample(ltxv, latent, mask, keyframe_idxs)
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    patched = node.execute(ltxv, 0.25, 0, "", "4x4x4").result[0]
    with caplog.at_level(logging.WARNING, logger="usv"):
        out = sample(patched, latent, mask, keyframe_idxs)
    assert torch.equal(out, dense)
    run = last_run(patched)
    assert run.paths() == {"dense:layout": 3}  # one batched call per step, none of it sparse
    warnings = [r.getMessage() for r in caplog.records if r.name == "usv" and r.getMessage().startswith(WARNING)]
    assert len(warnings) == 1, warnings
