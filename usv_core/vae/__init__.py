"""Exact fast decode of the Wan 2.1 VAE (also Wan 2.2 A14B's): channels-last, causal caches
written in place, RMS norm + bias + SiLU fused in Triton. Never imports comfy: it takes the VAE's
state dict (ComfyUI's key names) and the latent. On the CPU, whole_clip decodes the clip at once."""

from .decode import decode
from .norm import rms_norm
from .weights import Decoder, load, why_not
from .whole_clip import decode_whole_clip, whole_clip_bytes

__all__ = ["Decoder", "decode", "decode_whole_clip", "load", "memory_estimate", "rms_norm", "whole_clip_bytes",
           "why_not"]


def memory_estimate(dec: Decoder, latent_shape, dtype_size: int) -> int:
    """Bytes the decode of one latent needs on the device beyond the weights: every causal conv's
    two cached frames, the working tensors of the largest chunk, and the output."""
    _, _, t, h, w = latent_shape
    scale = 2 ** dec.spatial_ups
    frames = 2 ** dec.temporal_ups
    top = dec.head.weight.shape[1]  # channels at full resolution
    full = h * scale * w * scale
    # 7 caches of 2 frames at full resolution, 7 at each lower one (half, quarter, eighth) with twice the
    # channels at a quarter of the pixels: 2 * 7 * (1 + 1/2 + 1/4 + 1/16) ~ 26 full-res frames of `top` channels
    histories = 26 * full * top
    working = 5 * (frames + 2) * full * top  # two conv buffers, a conv output, the block input, one spare
    output = latent_shape[0] * dec.frames_out(t) * full * dec.out_channels
    return (histories + working + output) * dtype_size
