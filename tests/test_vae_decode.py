"""USV VAE Decode and usv_core.vae: the fast Wan 2.1 decode against ComfyUI's VAEDecode on the
same weights and latent (CPU at small, odd sizes; the GPU at bf16 where one exists), the fused
norm kernel against its PyTorch definition, and the fallbacks to ComfyUI's own decode."""

import logging

import pytest
import torch

from harness import test_nodes
from usv_core import vae as core
from usv_core.vae.norm import reference, rms_norm


def _rel_l2(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("c,bias,silu", [(16, True, True), (96, False, True), (100, True, False), (384, False, False)])
def test_norm_kernel_matches_its_definition(c, bias, silu):
    gen = torch.Generator().manual_seed(c)
    x = torch.randn(37, c, generator=gen) * 3
    gamma = (1 + 0.1 * torch.randn(c, generator=gen)) * c ** 0.5
    b = 0.5 * torch.randn(c, generator=gen) if bias else None
    # the output is a view with a row stride wider than C, as a causal conv's buffer slice can be
    buf = torch.full((37, c + 5), float("nan"))
    out = rms_norm(x, gamma, b, silu, out=buf[:, :c], backend="triton")
    want = reference(x, gamma, b, silu)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)  # NaN never passes assert_close
    assert _rel_l2(out, want) < 1e-6
    assert torch.isnan(buf[:, c:]).all()  # nothing written outside the view


def test_norm_kernel_in_bf16_and_a_zero_row():
    x = torch.randn(9, 96, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    x[3] = 0  # F.normalize's eps: a zero voxel stays zero, never NaN
    gamma = torch.full((96,), 96 ** 0.5)
    out = rms_norm(x, gamma, None, True, backend="triton")
    want = reference(x, gamma, None, True)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    assert (out.float() - want).abs().max() <= 0.02 and (out[3] == 0).all()


def test_norm_rejects_what_it_cannot_serve():
    with pytest.raises(ValueError, match="contiguous channels"):
        rms_norm(torch.randn(8, 4).t(), torch.ones(8))
    with pytest.raises(ValueError, match=r"gamma and bias must be \(4,\)"):
        rms_norm(torch.randn(8, 4), torch.ones(5))


@pytest.fixture(scope="module")
def wan_vae(comfy, tiny_vae):
    """ComfyUI's VAE object for the tiny random Wan 2.1 VAE, loaded by VAELoader."""
    from harness import runtime

    g = {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_vae}}}
    return runtime.run_workflow(g, outputs=("vae",)).output("vae")


def vae_decode(run_workflow, tiny_vae, z, node="VAEDecode"):
    g = {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": tiny_vae}},
         "latent": {"class_type": "USVTestLatent", "inputs": {"name": test_nodes.put_tensor(z)}},
         "decode": {"class_type": node, "inputs": {"samples": ["latent", 0], "vae": ["vae", 0]}}}
    return run_workflow(g, outputs=("decode",)).output("decode")


# 1 latent frame (one image) and 5 (17 frames); 24 x 40 and 16 x 24 pixels: neither a multiple of 64
ODD = [(1, 3, 5), (5, 2, 3)]


@pytest.mark.parametrize("frames,h,w", ODD)
def test_fast_decode_matches_vaedecode_on_odd_sizes(run_workflow, tiny_vae, wan_vae, frames, h, w):
    from harness import runtime

    node = runtime.pack_module("nodes.vae_decode")
    z = torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(frames))
    want = vae_decode(run_workflow, tiny_vae, z)
    got = node.decode_usv(wan_vae, z)  # the node's GPU path, here on the CPU
    assert want.shape == (1 + 4 * (frames - 1), 8 * h, 8 * w, 3)
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    assert torch.isfinite(got).all()
    assert (got - want).abs().max() <= 1e-4  # float32 on the CPU: same numbers up to summation order
    assert want.std() > 0.05  # the random VAE makes a picture, not a constant


def test_a_batch_of_two_videos_decodes_each_as_vaedecode_does(wan_vae):
    from harness import runtime

    node = runtime.pack_module("nodes.vae_decode")
    z = torch.randn(2, 16, 2, 2, 3, generator=torch.Generator().manual_seed(6))
    with torch.inference_mode():
        want = node.comfy_decode(wan_vae, z)
        got = node.decode_usv(wan_vae, z)
    assert want.shape == got.shape == (2 * 5, 16, 24, 3)  # the batches' frames one after the other
    assert (got - want).abs().max() <= 1e-4


def test_fused_kernel_path_through_the_whole_decoder(wan_vae):
    """The decode with the Triton kernel (interpreted on the CPU) equals its PyTorch-norm twin."""
    sd = wan_vae.first_stage_model.state_dict()
    dec = core.load(sd, "cpu", torch.float32)
    z = torch.randn(1, 16, 2, 1, 2, generator=torch.Generator().manual_seed(4))
    a = core.decode(dec, z, backend="triton")
    b = core.decode(dec, z, backend="torch")
    assert a.shape == (1, 5, 8, 16, 3)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frames,h,w", ODD)
def test_node_on_the_cpu_decodes_the_whole_clip_as_vaedecode(run_workflow, tiny_vae, frames, h, w, caplog):
    from harness import runtime

    node = runtime.pack_module("nodes.vae_decode")
    node._said.clear()
    z = torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(frames))
    want = vae_decode(run_workflow, tiny_vae, z)
    with caplog.at_level(logging.WARNING, logger="usv"):
        got = vae_decode(run_workflow, tiny_vae, z, node="USVVAEDecode")
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max() <= 1e-4  # float32: the same numbers up to summation order
    assert not [r for r in caplog.records if "USV VAE Decode" in r.getMessage()]  # nothing to say


def test_node_on_the_cpu_runs_comfyuis_decode_when_the_clip_does_not_fit(run_workflow, tiny_vae, wan_vae, caplog,
                                                                        monkeypatch):
    from harness import runtime

    node = runtime.pack_module("nodes.vae_decode")
    node._said.clear()  # once per process and reason: forget what earlier tests made it say
    monkeypatch.setattr(node.core, "whole_clip_bytes", lambda *a: 2**50)
    import comfy.model_management as mm

    free = iter(range(2**34, 2**35, 2**29))  # free memory moves between runs, and the message with it
    monkeypatch.setattr(mm, "get_free_memory", lambda *a, **k: next(free))
    z = torch.randn(1, 16, 2, 2, 3, generator=torch.Generator().manual_seed(2))
    want = vae_decode(run_workflow, tiny_vae, z)
    with caplog.at_level(logging.WARNING, logger="usv"):
        got = vae_decode(run_workflow, tiny_vae, z, node="USVVAEDecode")
        again = vae_decode(run_workflow, tiny_vae, z, node="USVVAEDecode")
    assert torch.equal(got, want) and torch.equal(again, want)
    said = [r.getMessage() for r in caplog.records if "USV VAE Decode" in r.getMessage()]
    assert len(said) == 1 and "whole clip would need" in said[0] and "ComfyUI's own VAE decode runs" in said[0]
    assert node.why_not(wan_vae, z) is None


def test_what_it_refuses_is_named(wan_vae):
    from harness import runtime

    node = runtime.pack_module("nodes.vae_decode")
    assert "not a Wan video latent" in node.why_not(wan_vae, torch.zeros(1, 4, 8, 8))
    assert "Wan 2.2 5B VAE" in core.why_not({"decoder.upsamples.0.upsamples.0.residual.2.weight": 0})
    assert "not a Wan 2.1 VAE" in core.why_not({"decoder.conv_in.weight": 0})
    with pytest.raises(ValueError, match="serves the Wan 2.1 VAE only"):
        core.load({"decoder.conv_in.weight": torch.zeros(1)}, "cpu", torch.float32)
    dec = core.load(wan_vae.first_stage_model.state_dict(), "cpu", torch.float32)
    with pytest.raises(ValueError, match="takes 16 channels"):
        core.decode(dec, torch.zeros(1, 4, 1, 2, 2))
    with pytest.raises(ValueError, match="move the latent first"):
        core.decode(dec, torch.zeros(1, 16, 1, 2, 2, dtype=torch.bfloat16))


def test_the_given_vae_is_not_changed(wan_vae):
    sd = {k: v.clone() for k, v in wan_vae.first_stage_model.state_dict().items()}
    dec = core.load(wan_vae.first_stage_model.state_dict(), "cpu", torch.float32)
    core.decode(dec, torch.randn(1, 16, 1, 2, 2))
    after = wan_vae.first_stage_model.state_dict()
    assert all(torch.equal(sd[k], after[k]) for k in sd)


@pytest.mark.gpu
@pytest.mark.parametrize("frames,h,w", [(1, 27, 45), (5, 27, 45), (3, 60, 104)])
def test_gpu_bf16_decode_is_vaedecode_up_to_bf16_rounding(comfy, frames, h, w):
    """The real Wan 2.1 VAE architecture (dim 96), random weights, on the GPU, 216 x 360 (odd) and
    480 x 832 pixels. float32 with TF32 off: the same numbers as ComfyUI's float32 decode. bf16:
    within 0.02 on [-1, 1] of VAEDecode, or, where ComfyUI's own bf16 rounding noise on random
    weights is larger than that, no further from the float32 decode than ComfyUI's bf16 is."""
    import comfy.sd
    from harness import runtime, tiny_models

    node = runtime.pack_module("nodes.vae_decode")
    sd = tiny_models.wan21_vae_state_dict(0, dim=96)
    vae16, vae32 = comfy.sd.VAE(sd=sd), comfy.sd.VAE(sd=sd, dtype=torch.float32)
    assert vae16.vae_dtype == torch.bfloat16
    z = torch.randn(1, 16, frames, h, w, generator=torch.Generator().manual_seed(frames))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.inference_mode(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            want32 = node.comfy_decode(vae32, z)
            got32 = node.decode_usv(vae32, z)
            want16 = node.comfy_decode(vae16, z)
            got16 = node.decode_usv(vae16, z)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert node.why_not(vae16, z) is None and got16 is not None and got32 is not None
    assert got16.shape == want16.shape == (1 + 4 * (frames - 1), 8 * h, 8 * w, 3)
    assert torch.isfinite(got16).all() and torch.isfinite(got32).all()
    assert (got32 - want32).abs().max().item() * 2 <= 1e-3  # [0, 1] -> [-1, 1]
    err = (got16 - want16).abs().max().item() * 2
    noise = (want16 - want32).abs().max().item() * 2  # ComfyUI's own bf16 rounding
    ours = (got16 - want32).abs().max().item() * 2
    assert err <= 0.02 or ours <= 1.25 * noise, (err, ours, noise)
