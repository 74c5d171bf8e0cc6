"""The Wan 2.1 VAE decode of a whole clip at once, for the CPU.

ComfyUI decodes Wan's VAE one latent frame at a time, each causal convolution reading a cache of
the frames before. usv_core.world.vae runs the same architecture over the whole clip, every causal
convolution seeing the same past, so it computes the same numbers (tests/test_world_models.py);
on a CPU a few large convolutions run several times faster than many small ones (the 17-frame
USV World clip: 3.9 s against ComfyUI's 12 s on two cores). It holds every frame's activations at
once, so it serves only what fits in memory (whole_clip_bytes).
"""

from __future__ import annotations

import torch

from ..world.vae import WanVAE


def decoder_from_state(sd: dict) -> WanVAE:
    """Our WanVAE over the decoder weights of a Wan 2.1 VAE state dict (ComfyUI's key names); the
    tensors are shared, not copied, and nothing in `sd` changes."""
    dim = int(sd["decoder.head.0.gamma"].shape[0])
    with torch.device("meta"):  # no weights are made: the state dict's tensors are assigned below
        vae = WanVAE(dim=dim)
    del vae.encoder, vae.conv1  # decode only
    keys = {k: v for k, v in sd.items() if k.startswith(("decoder.", "conv2."))}
    vae.load_state_dict(keys, strict=True, assign=True)
    return vae.eval()


def whole_clip_bytes(sd: dict, latent_shape, dtype_size: int) -> int:
    """A bound on the working memory: about eight tensors of the full-resolution stage alive at
    once (its channels are the base width, the lower stages' more channels on fewer pixels)."""
    b, _, t, h, w = latent_shape
    dim = int(sd["decoder.head.0.gamma"].shape[0])
    frames = 1 + 4 * (t - 1)
    return 8 * b * frames * (h * 8) * (w * 8) * dim * dtype_size


@torch.inference_mode()
def decode_whole_clip(sd: dict, z: torch.Tensor) -> torch.Tensor:
    """z (B, 16, T, h, w) raw latent -> (B, T', H, W, 3) in z's dtype, as ComfyUI's
    first_stage_model.decode(z).movedim(1, -1) returns it."""
    vae = decoder_from_state(sd)
    return vae.decode(z).movedim(1, -1)
