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


def guided_inputs():
    """(positive, negative, latent, denoise mask) after ComfyUI's own LTXVAddGuide.append_keyframe has
    appended one guide frame, dilated by 2 (IC-LoRA's small grid) where the release supports it: its
    token positions go into the conditioning as keyframe_idxs, and its mask is negative where dilated."""
    from comfy_extras import nodes_lt

    add_guide = nodes_lt.LTXVAddGuide
    gen = torch.Generator().manual_seed(11)
    small = torch.randn(1, 128, 1, 8 // DILATION, 8 // DILATION, generator=gen)
    guide = torch.zeros(1, 128, 1, 8, 8)
    guide[..., ::DILATION, ::DILATION] = small
    extra = {}
    if "guide_mask" in inspect.signature(add_guide.append_keyframe).parameters:  # 0.8+
        guide_mask = torch.full((1, 1, 1, 8, 8), -1.0)  # as LTXVAddGuide.dilate_latent builds it
        guide_mask[..., ::DILATION, ::DILATION] = 1.0
        extra["guide_mask"] = guide_mask
    text = {"attention_mask": torch.ones(1, 8, dtype=torch.long)}  # as LTX-Video's text encoder sends it
    positive = [[tiny_models.text_conditioning(3), dict(text)]]
    negative = [[tiny_models.text_conditioning(4), dict(text)]]
    positive, negative, latent, mask = add_guide.append_keyframe(
        positive, negative, GUIDE_FRAME_IDX, torch.zeros(VIDEO), torch.ones(1, 1, VIDEO[2], 1, 1), guide, 1.0,
        (8, 32, 32), **extra)
    if hasattr(nodes_lt, "_append_guide_attention_entry"):  # 0.22+: per-guide attention entries
        positive, negative = nodes_lt._append_guide_attention_entry(positive, negative, 64, [1, 8, 8], strength=1.0)
    return positive, negative, latent, mask


def sample(patcher, positive, negative, latent, mask, steps=3):
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(positive, negative)
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
    inputs = guided_inputs()
    return inputs, sample(ltxv, *inputs)


def test_all_cubes_kept_matches_dense_with_guide_tokens_after_the_grid(comfy_nodes, ltxv, guided):
    inputs, dense = guided
    positive, _negative, latent, mask = inputs
    assert latent.shape[2] == VIDEO[2] + 1 and positive[0][1]["keyframe_idxs"].shape[2] == 64
    if drops_tokens():  # the dilated guide: 16 of its 64 tokens survive, none of the video's is dropped
        assert int((mask[0, 0, VIDEO[2]:] >= 0).sum()) == KEPT_GUIDE_TOKENS and bool((mask[0, 0, :VIDEO[2]] >= 0).all())
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    patched = node.execute(ltxv, 0.999, 0, "", "4x4x4").result[0]  # every cube kept, still the sparse path
    out = sample(patched, *inputs)
    run = last_run(patched)
    assert sparse_calls(run) == {(s, b) for s in range(3) for b in range(2)}
    assert run.paths()["sparse"] == 6 and not any(p.startswith("dense") for p in run.paths())
    if drops_tokens():
        assert run.grid == VIDEO[2:]  # the video frames; the 16 surviving guide tokens follow densely
    else:
        assert run.grid == (VIDEO[2] + 1,) + VIDEO[3:]  # no tokens dropped: the guide frame is a grid frame
    assert (out - dense).abs().max() < 1e-4


def test_keep_quarter_runs_sparse_with_guides(comfy_nodes, ltxv, guided):
    inputs, dense = guided
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    patched = node.execute(ltxv, 0.25, 1, "", "4x4x4").result[0]
    out = sample(patched, *inputs)
    assert torch.isfinite(out).all() and not torch.allclose(out, dense, atol=1e-4)
    run = last_run(patched)
    assert sparse_calls(run) == {(s, b) for s in (1, 2) for b in (0, 1)}
    assert run.grid == (VIDEO[2:] if drops_tokens() else (VIDEO[2] + 1,) + VIDEO[3:])


def test_tokens_dropped_inside_the_video_run_dense_and_say_why_once(comfy_nodes, ltxv, caplog):
    if not drops_tokens():
        pytest.skip("this ComfyUI's LTXVModel never drops tokens (no denoise_mask in _forward before 0.8)")
    positive, negative, latent, mask = guided_inputs()
    mask = mask.clone()
    mask[:, :, 2, :4, :] = -1.0  # half of video frame 2 dropped
    inputs = (positive, negative, latent, mask)
    dense = sample(ltxv, *inputs)
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    patched = node.execute(ltxv, 0.25, 0, "", "4x4x4").result[0]
    with caplog.at_level(logging.WARNING, logger="usv"):
        out = sample(patched, *inputs)
    assert torch.equal(out, dense)
    run = last_run(patched)
    assert run.paths() == {"dense:layout": 3}  # one batched call per step, none of it sparse
    warnings = [r.getMessage() for r in caplog.records if r.name == "usv" and r.getMessage().startswith(WARNING)]
    assert len(warnings) == 1, warnings


def test_guides_below_full_strength_run_dense_and_say_why_once(comfy_nodes, ltxv, caplog):
    """0.22+: a guide strength below 1 attenuates attention to the guide by splitting self-attention
    into query groups over all keys, a call the sparse path does not model."""
    from comfy_extras import nodes_lt

    if not hasattr(nodes_lt, "_append_guide_attention_entry"):
        pytest.skip("this ComfyUI has no per-guide attention strength (0.22+)")
    positive, negative, latent, mask = guided_inputs()
    for cond in (positive, negative):
        for _tensor, extra in cond:
            for entry in extra.get("guide_attention_entries", []):
                entry["strength"] = 0.5
    inputs = (positive, negative, latent, mask)
    dense = sample(ltxv, *inputs)
    patched = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"].execute(ltxv, 0.25, 0, "", "4x4x4").result[0]
    with caplog.at_level(logging.WARNING, logger="usv"):
        out = sample(patched, *inputs)
    assert torch.equal(out, dense)
    assert last_run(patched).paths()["dense:split"] == 3 * 2
    warnings = [r.getMessage() for r in caplog.records if r.name == "usv" and "came in parts" in r.getMessage()]
    assert len(warnings) == 1, warnings
