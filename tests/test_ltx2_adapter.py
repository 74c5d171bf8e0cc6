"""USV on a tiny random LTX-2 (ComfyUI's LTXAVModel: video and audio in one transformer), built from
ComfyUI's own classes and sampled through comfy.samplers.CFGGuider with a nested video+audio latent,
as ComfyUI samples LTX-2. Sparse attention serves the video self-attention (attn1) of each block;
the text cross-attention, audio self- and cross-attention and both audio-video attentions are handed on."""

from collections import Counter

import pytest
import torch

from harness import tiny_models

CAPTION = 64  # the text encoder's width per modality: conditioning carries video and audio halves
VIDEO_LATENT = (1, 128, 5, 8, 8)  # grid (5, 8, 8): 2 x 2 x 2 cubes of 4x4x4, edge cubes in time
AUDIO_LATENT = (1, 8, 6, 16)  # LTX-2's audio latent: 8 channels x 16 frequency bins per time step
ATTENTION_CALLS_PER_BLOCK = 6  # video self, video-text, audio self, audio-text, audio->video, video->audio


@pytest.fixture(scope="module")
def ltx2(comfy):
    try:
        import comfy.ldm.lightricks.av_model  # noqa: F401  (LTX-2 arrived in ComfyUI 0.8)
    except ImportError:
        pytest.skip("this ComfyUI has no LTX-2 (comfy.ldm.lightricks.av_model, added in 0.8)")
    return tiny_ltx2()


def tiny_ltx2(seed=7):
    """A ModelPatcher of a tiny random LTX-2: video 2 heads of 64, audio 2 heads of 32, 2 blocks."""
    import comfy.model_patcher
    import comfy.supported_models

    config = comfy.supported_models.LTXAV({
        "image_model": "ltxav", "num_layers": 2, "in_channels": 128,
        "attention_head_dim": 64, "num_attention_heads": 2, "cross_attention_dim": 128,  # video: 2 heads of 64
        "audio_in_channels": 128, "audio_attention_head_dim": 32, "audio_num_attention_heads": 2,
        "audio_cross_attention_dim": 64, "caption_channels": CAPTION,
        # text connectors that newer releases build into the model: small
        "connector_attention_head_dim": 32, "connector_num_attention_heads": 2, "connector_num_layers": 1,
    })
    cpu = torch.device("cpu")
    model = config.get_model({}, device=cpu)
    model.diffusion_model.load_state_dict(tiny_models._fill(model.diffusion_model, seed=seed))
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _text(seed):
    """Processed LTX-2 text conditioning: (1, tokens, video half + audio half)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 8, 2 * CAPTION, generator=gen)


def sample(patcher, steps=3):
    import comfy.nested_tensor
    import comfy.samplers

    guider = comfy.samplers.CFGGuider(patcher)
    mask = {"attention_mask": torch.ones(1, 8, dtype=torch.long), "frame_rate": 25}
    guider.set_conds([[_text(3), dict(mask)]], [[_text(4), dict(mask)]])
    guider.set_cfg(3.0)
    sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", steps)
    gen = torch.Generator().manual_seed(0)
    latent = comfy.nested_tensor.NestedTensor((torch.zeros(VIDEO_LATENT), torch.zeros(AUDIO_LATENT)))
    noise = comfy.nested_tensor.NestedTensor((torch.randn(VIDEO_LATENT, generator=gen),
                                              torch.randn(AUDIO_LATENT, generator=gen)))
    out = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0)
    video, audio = out.unbind()
    assert video.shape == VIDEO_LATENT and audio.shape == AUDIO_LATENT
    return video, audio


def test_model_info_names_ltx2(comfy_nodes, ltx2):
    text = comfy_nodes.NODE_CLASS_MAPPINGS["USVModelInfo"].execute(ltx2).result[0]
    assert "LTX-2" in text and "audio-video" in text
    assert "heads: 2, head dim: 64" in text and "layers: 2" in text and "USV can patch it" in text


def test_keep_one_equals_the_unpatched_model(comfy_nodes, ltx2):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    dense_video, dense_audio = sample(ltx2)
    video, audio = sample(node.execute(ltx2, 1.0, 0, "", "4x4x4").result[0])
    assert torch.equal(video, dense_video) and torch.equal(audio, dense_audio)


def test_sparse_serves_video_self_attention_and_hands_on_the_rest(comfy_nodes, ltx2):
    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    dense_video, dense_audio = sample(ltx2)
    patched = node.execute(ltx2, 0.25, 1, "", "4x4x4").result[0]
    video, audio = sample(patched)
    assert torch.isfinite(video).all() and torch.isfinite(audio).all()
    assert not torch.allclose(video, dense_video, atol=1e-4)

    run = patched.model_options["transformer_options"]["usv_patch"].last_run
    assert run.grid == (5, 8, 8)
    by_step_block = {}
    for (step, block, path), n in run.calls.items():
        by_step_block.setdefault((step, block), Counter())[path] += n
    # CFG runs positive and negative in one batched call per step: one video self-attention per block
    assert set(by_step_block) == {(s, b) for s in range(3) for b in range(2)}
    for (step, block), paths in by_step_block.items():
        first = "dense:step" if step == 0 else "sparse"
        assert paths == Counter({first: 1, "declined": ATTENTION_CALLS_PER_BLOCK - 1}), (step, block, paths)
    assert set(run.keep) == {(s, b) for s in (1, 2) for b in range(2)}


def test_token_merge_refuses_ltx2_with_the_reason(comfy_nodes, ltx2):
    with pytest.raises(ValueError, match="supports Wan 2.1 / 2.2 models; this is LTX-2"):
        comfy_nodes.NODE_CLASS_MAPPINGS["USVTokenMerge"].execute(ltx2, 0.5, 1, "", "keys")


def test_keyframe_guides_on_ltx2_keep_the_video_frames_as_the_grid(comfy_nodes, ltx2):
    """LTX-2 takes LTXVAddGuide's guides on its video latent (then concatenated with the audio latent):
    with guide tokens dropped (0.8+ always drops them), the surviving ones follow the grid, attended densely."""
    import comfy.nested_tensor
    import comfy.samplers
    from test_ltxv_guides import guided_inputs

    positive, negative, video, video_mask = guided_inputs()
    assert video_mask.min() < 0  # some guide tokens are dropped
    positive = [[_text(3), positive[0][1]]]  # LTX-2's text conditioning, the guide's keyframe_idxs
    negative = [[_text(4), negative[0][1]]]

    def run(patcher):
        guider = comfy.samplers.CFGGuider(patcher)
        guider.set_conds(positive, negative)
        guider.set_cfg(3.0)
        sigmas = comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), "simple", 3)
        gen = torch.Generator().manual_seed(0)
        latent = comfy.nested_tensor.NestedTensor((video, torch.zeros(AUDIO_LATENT)))
        noise = comfy.nested_tensor.NestedTensor((torch.randn(video.shape, generator=gen),
                                                  torch.randn(AUDIO_LATENT, generator=gen)))
        mask = comfy.nested_tensor.NestedTensor((video_mask, torch.ones(AUDIO_LATENT)))  # as LTXVConcatAVLatent
        return guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, denoise_mask=mask,
                             seed=0).unbind()

    node = comfy_nodes.NODE_CLASS_MAPPINGS["USVSparseAttention"]
    dense_video, dense_audio = run(ltx2)
    patched = node.execute(ltx2, 0.999, 0, "", "4x4x4").result[0]  # every cube kept, still the sparse path
    out_video, out_audio = run(patched)
    run_stats = patched.model_options["transformer_options"]["usv_patch"].last_run
    assert run_stats.grid == VIDEO_LATENT[2:]
    assert dict(run_stats.paths()) == {"sparse": 6, "declined": 6 * (ATTENTION_CALLS_PER_BLOCK - 1)}
    assert (out_video - dense_video).abs().max() < 1e-4 and (out_audio - dense_audio).abs().max() < 1e-4
