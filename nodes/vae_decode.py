"""USV VAE Decode: VAEDecode for the Wan 2.1 VAE (also Wan 2.2 A14B's) with usv_core.vae's
exact fast decode on the GPU, and on the CPU the whole clip at once where it fits in memory.
Anything it cannot serve (another VAE, weights not all on the GPU, too little free memory) goes to
ComfyUI's own decode, which tiles when memory runs out, and the log says once why."""

from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..usv_core import vae as core

log = logging.getLogger("usv")
_said: set[str] = set()


def _say_once(reason: str, kind: str | None = None) -> None:
    """Once per kind of reason: a reason that quotes free memory reads differently on every call."""
    kind = kind or reason
    if kind not in _said:
        _said.add(kind)
        log.warning("USV VAE Decode: %s; ComfyUI's own VAE decode runs (tiled if memory runs out)", reason)


def latent_of(samples: dict) -> torch.Tensor:
    latent = samples["samples"]
    if getattr(latent, "is_nested", False):  # 0.28: nested latents (video + audio); the video comes first
        latent = latent.unbind()[0]
    return latent


def why_not(vae, latent: torch.Tensor) -> str | None:
    """Why the fast decode does not serve this VAE and latent; None when it does."""
    model = getattr(vae, "first_stage_model", None)
    cls = type(model)
    if cls.__name__ != "WanVAE" or cls.__module__ != "comfy.ldm.wan.vae":
        return f"the VAE is {cls.__module__}.{cls.__name__}, not the Wan 2.1 VAE"
    if latent.ndim != 5 or latent.shape[1] != 16 or latent.shape[2] < 1:
        return f"latent of shape {tuple(latent.shape)} is not a Wan video latent (batch, 16, frames, h, w)"
    if getattr(vae, "output_channels", 3) != 3 or getattr(vae, "conv_out_channels", 3) != 3:
        return "the VAE does not decode to 3 channels"
    if torch.device(vae.device).type not in ("cuda", "cpu"):
        return f"the VAE is on {torch.device(vae.device).type} (the fast decodes are for CUDA and the CPU)"
    return None


def _to_output(vae, raw: torch.Tensor) -> torch.Tensor:
    out_dtype = vae.vae_output_dtype() if hasattr(vae, "vae_output_dtype") else torch.float32
    return raw.to(device=vae.output_device, dtype=out_dtype)


def _images(vae, raw: torch.Tensor) -> torch.Tensor:
    """The raw decode (B, T', H, W, C) in [-1, 1] on the output device -> what VAEDecode returns,
    (frames, H, W, 3) in [0, 1]."""
    images = vae.process_output(raw)
    return images.reshape(-1, *images.shape[-3:])


def decode_cpu(vae, latent: torch.Tensor) -> torch.Tensor | None:
    """On the CPU: the whole clip at once (usv_core.vae.whole_clip), ComfyUI's numbers in a few
    large convolutions; None (after one log line) when it would not fit in free memory."""
    import comfy.model_management as mm

    dtype = vae.vae_dtype
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(latent.shape, dtype))
    sd = vae.first_stage_model.state_dict()
    reason = core.why_not(sd)
    if reason:
        _say_once(reason)
        return None
    need = core.whole_clip_bytes(sd, latent.shape, torch.tensor([], dtype=dtype).element_size())
    free = mm.get_free_memory(torch.device("cpu"))
    if need > free // 2:
        _say_once(f"on the CPU the whole clip would need about {need / 2**30:.1f} GB ({free / 2**30:.1f} GB free)",
                  kind="cpu memory")
        return None
    return _images(vae, _to_output(vae, core.decode_whole_clip(sd, latent.to(device="cpu", dtype=dtype))))


def decode_usv(vae, latent: torch.Tensor) -> torch.Tensor | None:
    """The decode as VAEDecode returns it, (frames, H, W, 3) in [0, 1] on the VAE's output device;
    None (after one log line) when memory does not allow it, for the caller to run ComfyUI's."""
    import comfy.model_management as mm

    device, dtype = vae.device, vae.vae_dtype
    # load the weights as VAEDecode would, with ComfyUI's own estimate of the decode's memory
    mm.load_models_gpu([vae.patcher], memory_required=vae.memory_used_decode(latent.shape, dtype),
                       force_full_load=getattr(vae, "disable_offload", False))
    sd = vae.first_stage_model.state_dict()
    if any(t.device != torch.device(device) for k, t in sd.items() if k.startswith(("decoder.", "conv2."))):
        _say_once("the VAE's weights are not all on the GPU (low VRAM)")
        return None
    reason = core.why_not(sd)
    if reason:
        _say_once(reason)
        return None
    dec = core.load(sd, device, dtype)
    need = core.memory_estimate(dec, latent.shape, torch.tensor([], dtype=dtype).element_size())
    free = mm.get_free_memory(device)
    if free < need:
        _say_once(f"too little free memory (about {need / 2**30:.1f} GB needed, {free / 2**30:.1f} GB free)",
                  kind="gpu memory")
        return None
    try:
        raw = core.decode(dec, latent.to(device=device, dtype=dtype))
    except torch.cuda.OutOfMemoryError:
        raw = None
    if raw is None:  # out of the except block, so the failed chunk's tensors are freed
        del dec
        mm.soft_empty_cache()
        _say_once("ran out of memory")
        return None
    images = _to_output(vae, raw)
    del raw  # the GPU copy, before process_output allocates on the output device
    return _images(vae, images)


def comfy_decode(vae, latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI's VAEDecode."""
    images = vae.decode(latent)
    if images.ndim == 5:
        images = images.reshape(-1, *images.shape[-3:])
    return images


class USVVAEDecode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVVAEDecode",
            display_name="USV VAE Decode",
            category="USV",
            description=(
                "VAE Decode, faster for the Wan 2.1 VAE (Wan 2.1 and Wan 2.2 14B): on the GPU the same decode up to "
                "bf16 rounding, in channels-last memory with fused norm kernels; on the CPU the whole clip at once "
                "where it fits in memory. Other VAEs and too little free memory run ComfyUI's own VAE Decode "
                "(tiled when memory runs out)."),
            inputs=[
                io.Latent.Input("samples", tooltip="The latent to decode."),
                io.Vae.Input("vae", tooltip="The VAE that decodes it."),
            ],
            outputs=[io.Image.Output()],
        )

    @classmethod
    def execute(cls, samples, vae) -> io.NodeOutput:
        latent = latent_of(samples)
        reason = why_not(vae, latent)
        images = None
        if reason is None:
            cuda = torch.device(vae.device).type == "cuda"
            images = decode_usv(vae, latent) if cuda else decode_cpu(vae, latent)
        else:
            _say_once(reason)
        if images is None:
            images = comfy_decode(vae, latent)
        return io.NodeOutput(images)
