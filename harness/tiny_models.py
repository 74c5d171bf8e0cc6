"""Tiny random models in the real architectures' weight layouts, deterministic from a seed and
written as safetensors, so that ComfyUI's own loaders detect and load them.

Wan 2.1 T2V: dim a multiple of 128 (the loader derives heads = dim // 128) and text_dim 4096
(the loader assumes it). Tests pass conditioning as a tensor; no text encoder is involved.
"""

from __future__ import annotations

import os

import torch
from safetensors.torch import save_file

from . import runtime

TEXT_DIM = 4096


def _fill(module: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Deterministic weights: normal scaled by fan-in, norms at one, biases small."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in sorted(module.state_dict().items()):
        if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            out[name] = p.clone()
            continue
        if p.ndim <= 1:
            if "norm" in name or name.endswith("gamma") or name.endswith(".weight"):
                t = 1.0 + 0.02 * torch.randn(p.shape, generator=gen)
            else:
                t = 0.02 * torch.randn(p.shape, generator=gen)
        else:
            fan_in = p[0].numel()
            t = torch.randn(p.shape, generator=gen) / fan_in**0.5
        out[name] = t.to(torch.float32).contiguous()
    return out


def wan21_t2v_state_dict(seed: int = 0, dim: int = 256, layers: int = 2, ffn_dim: int = 512,
                         in_dim: int = 16, model_type: str = "t2v") -> dict[str, torch.Tensor]:
    runtime.boot()
    import comfy.ops
    from comfy.ldm.wan.model import WanModel

    model = WanModel(model_type=model_type, dim=dim, ffn_dim=ffn_dim, num_heads=dim // 128,
                     num_layers=layers, in_dim=in_dim, out_dim=16, text_dim=TEXT_DIM,
                     operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32)
    sd = _fill(model, seed)
    # The head's modulation is a learned table; scale it like the real checkpoints' small values.
    sd["head.modulation"] = sd["head.modulation"] * 0.1
    return sd


def wan21_vae_state_dict(seed: int = 0, dim: int = 16) -> dict[str, torch.Tensor]:
    runtime.boot()
    from comfy.ldm.wan.vae import WanVAE

    vae = WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    return _fill(vae, seed)


def write(kind: str, name: str, state_dict: dict[str, torch.Tensor]) -> str:
    """Save into ComfyUI's model folder of `kind`; returns the file name the loaders list."""
    path = runtime.model_path(kind, name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        save_file(state_dict, path)
    return name


def tiny_wan_t2v(seed: int = 0, **cfg) -> str:
    """File name (under diffusion_models) of a tiny random Wan 2.1 T2V."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(cfg.items()))
    return write("diffusion_models", f"tiny_wan21_t2v_s{seed}{'-' + tag if tag else ''}.safetensors",
                 wan21_t2v_state_dict(seed, **cfg))


def tiny_wan_vae(seed: int = 0, dim: int = 16) -> str:
    """File name (under vae) of a tiny random Wan 2.1 VAE."""
    return write("vae", f"tiny_wan21_vae_s{seed}_d{dim}.safetensors", wan21_vae_state_dict(seed, dim))


def text_conditioning(seed: int = 0, tokens: int = 8, batch: int = 1) -> torch.Tensor:
    """A stand-in for umT5 output: (batch, tokens, 4096)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, TEXT_DIM, generator=gen)


def tiny_sd15(seed: int = 0):
    """A ModelPatcher of a tiny SD1.5-style UNet (eps prediction, not flow matching), built from
    ComfyUI's own classes with small deterministic weights: the model USV cannot patch."""
    runtime.boot()
    import comfy.model_patcher
    import comfy.supported_models

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
        "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
        "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "num_head_channels": -1, "use_temporal_resblock": False,
        "use_temporal_attention": False,
    }
    model = comfy.supported_models.SD15(unet_config).get_model({}, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)  # ComfyUI skips weight init
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _patcher(model):
    import comfy.model_patcher

    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def _with_release_fields(params_class, config: dict) -> dict:
    """`config` plus every field the running release's params dataclass adds and `config` lacks,
    switched off (False for flags, None otherwise): HunyuanVideoParams gained meanflow_sum in 0.4."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(params_class)
    out = dict(config)
    for f in dataclasses.fields(params_class):
        if f.name not in out and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            out[f.name] = False if hints.get(f.name) is bool else None
    return out


def tiny_hunyuan_video(seed: int = 5, pooled_dim: int = 32, context_dim: int = 64, hidden_size: int = 256,
                       num_heads: int = 2, depth: int = 1, depth_single_blocks: int = 1):
    """A ModelPatcher of a tiny random HunyuanVideo (T2V, no guidance embedding), built from ComfyUI's
    own classes; the fields newer releases added to its params are off."""
    runtime.boot()
    import comfy.supported_models
    from comfy.ldm.hunyuan_video.model import HunyuanVideoParams

    config = _with_release_fields(HunyuanVideoParams, {
        "in_channels": 16, "out_channels": 16, "vec_in_dim": pooled_dim,
        "context_in_dim": context_dim, "hidden_size": hidden_size, "mlp_ratio": 2.0, "num_heads": num_heads,
        "depth": depth, "depth_single_blocks": depth_single_blocks, "axes_dim": [16, 56, 56], "theta": 256,
        "patch_size": [1, 2, 2], "qkv_bias": True, "guidance_embed": False, "byt5": False, "meanflow": False,
        "use_cond_type_embedding": False, "vision_in_dim": None,
    })
    model = comfy.supported_models.HunyuanVideo({"image_model": "hunyuan_video", **config}).get_model(
        {}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(_fill(model.diffusion_model, seed=seed))
    return _patcher(model)


def tiny_ltxv(seed: int = 4, num_layers: int = 2):
    """A ModelPatcher of a tiny random LTX-Video (2 heads of 64, 128 latent channels), built from
    ComfyUI's own classes."""
    runtime.boot()
    import comfy.supported_models

    config = comfy.supported_models.LTXV({"image_model": "ltxv", "num_layers": num_layers, "attention_head_dim": 64,
                                          "num_attention_heads": 2, "cross_attention_dim": 128,
                                          "caption_channels": TEXT_DIM, "in_channels": 128})
    model = config.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(_fill(model.diffusion_model, seed=seed))
    return _patcher(model)


def sample_wan(model, steps: int = 3, cond_extra: dict | None = None, latent_shape=(1, 16, 3, 16, 16), cfg: float = 4.0):
    """Sample a Wan MODEL (a ModelPatcher) through ComfyUI's CFGGuider and euler, with fixed noise
    and the stand-in conditioning of seeds 1 (positive) and 2 (negative); `cond_extra` goes into
    both conditionings (reference_latents, context_latents, ...). Runs under inference_mode, as
    ComfyUI's executor runs nodes."""
    import comfy.samplers

    extra = cond_extra or {}
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds([[text_conditioning(1), dict(extra)]], [[text_conditioning(2), dict(extra)]])
    guider.set_cfg(cfg)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    noise = torch.randn(latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return guider.sample(noise, torch.zeros(latent_shape), comfy.samplers.sampler_object("euler"), sigmas, seed=0)
