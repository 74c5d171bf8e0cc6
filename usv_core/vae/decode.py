"""The Wan 2.1 VAE decode, exact up to rounding, one latent frame at a time as ComfyUI runs it.

ComfyUI decodes latent frame by frame and every causal conv keeps the last two frames it read;
that is the same as one causal pass over the whole clip (zero frames before the start), which is
the definition here. The first latent frame makes one output frame (the temporal upsamplers
skip it, ComfyUI's 'Rep'), each later one 2 ** (temporal upsamplers) frames.

How it differs from ComfyUI's code, for speed and memory, not in results:
- channels_last_3d everywhere, so cuDNN runs its NHWC kernels without transposing around each conv;
- a causal conv's input is one buffer [two cached frames, this chunk]: the norm writes its output
  straight into the buffer, so there is no torch.cat and no F.pad copy (spatial padding is the
  conv's own), and only the two frames of history are copied out for the next chunk;
- RMS norm + the previous conv's bias + SiLU in one Triton kernel (norm.py);
- the shortcut's 1x1x1 conv is a matrix product added in place, its bias folded into conv2's;
- nearest 2x + 3x3 conv as one 2x2 conv making the four sub-pixel phases (weights.subpixel);
- the output is written chunk by chunk into one tensor, never concatenated.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from .norm import rms_norm, rows
from .weights import CL3D, AttnBlock, Conv, Decoder, ResBlock, Upsample


class _Stream:
    """The two-frame histories of every causal conv during one decode."""

    def __init__(self, backend: str):
        self.history: dict[int, torch.Tensor] = {}
        self.backend = backend

    def causal(self, conv: Conv, channels: int, frames: int, like: torch.Tensor, fill, bias: bool = True):
        """conv over [history, chunk]; fill(dst) writes the chunk into dst, a view of the buffer."""
        _, _, _, h, w = like.shape
        ctx = conv.context
        buf = torch.empty((1, channels, ctx + frames, h, w), device=like.device, dtype=like.dtype,
                          memory_format=CL3D)
        hist = self.history.get(id(conv))
        if ctx:
            if hist is None:
                buf[:, :, :ctx].zero_()
            else:
                buf[:, :, :ctx].copy_(hist)
        fill(buf[:, :, ctx:])
        out = F.conv3d(buf, conv.weight, conv.bias if bias else None, padding=(0, *conv.pad))
        if ctx:
            if hist is None:
                self.history[id(conv)] = buf[:, :, -ctx:].clone(memory_format=CL3D)
            else:
                hist.copy_(buf[:, :, -ctx:])
        return out.contiguous(memory_format=CL3D)

    def norm_into(self, x, gamma, bias=None, silu=True):
        def fill(dst):
            rms_norm(rows(x), gamma, bias, silu, out=rows(dst), backend=self.backend)
        return fill

    def res(self, blk: ResBlock, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[2]
        c_out = blk.conv1.weight.shape[0]
        h = self.causal(blk.conv1, x.shape[1], t, x, self.norm_into(x, blk.gamma1), bias=False)
        h = self.causal(blk.conv2, c_out, t, h, self.norm_into(h, blk.gamma2, blk.conv1.bias))
        out = rows(h)
        if blk.shortcut is None:
            out.add_(rows(x))
        else:
            out.addmm_(rows(x), blk.shortcut)
        return h

    def attn(self, blk: AttnBlock, x: torch.Tensor) -> torch.Tensor:
        # single-head attention over each frame's pixels, as ComfyUI's AttentionBlock
        _, c, t, hh, ww = x.shape
        r = rows(x)
        n = rms_norm(r, blk.gamma, None, silu=False, backend=self.backend)
        q, k, v = F.linear(n, blk.qkv, blk.qkv_bias).view(t, hh * ww, 3, c).unbind(2)
        o = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1))
        y = torch.addmm(blk.proj_bias, o.reshape(-1, c), blk.proj.t())
        y.add_(r)
        return y.view(1, t, hh, ww, c).permute(0, 4, 1, 2, 3)

    def up(self, blk: Upsample, x: torch.Tensor, first: bool) -> torch.Tensor:
        _, c, t, hh, ww = x.shape
        if blk.temporal is not None and not first:
            y = self.causal(blk.temporal, c, t, x, lambda dst: dst.copy_(x))
            # channels [0, c) are the even output frame, [c, 2c) the odd one
            y = y.permute(0, 2, 3, 4, 1).reshape(t, hh, ww, 2, c).permute(0, 3, 1, 2, 4).reshape(2 * t, hh, ww, c)
            frames = y.permute(0, 3, 1, 2)  # (2t, C, H, W), channels_last
        else:
            frames = x[0].transpose(0, 1)  # (t, C, H, W), channels_last
        n = frames.shape[0]
        c_out = blk.bias.shape[0] // 4
        y = F.conv2d(frames, blk.conv, blk.bias, padding=1)  # (n, 4 c_out, h + 1, w + 1)
        out = torch.empty((n, c_out, 2 * hh, 2 * ww), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
        for a in (0, 1):
            for b in (0, 1):
                ab = 2 * a + b
                out[:, :, a::2, b::2] = y[:, ab * c_out:(ab + 1) * c_out, a:a + hh, b:b + ww]
        return out.transpose(0, 1).unsqueeze(0)  # (1, C', t', 2H, 2W), channels_last_3d

    def chunk(self, dec: Decoder, z: torch.Tensor, first: bool) -> torch.Tensor:
        """z: (1, C, t, h, w) after the VAE's conv2 -> (1, out, t', H, W)."""
        x = self.causal(dec.conv1, z.shape[1], z.shape[2], z, lambda dst: dst.copy_(z))
        for blk in dec.middle + dec.ups:
            if isinstance(blk, ResBlock):
                x = self.res(blk, x)
            elif isinstance(blk, AttnBlock):
                x = self.attn(blk, x)
            else:
                x = self.up(blk, x, first)
        return self.causal(dec.head, x.shape[1], x.shape[2], x, self.norm_into(x, dec.head_gamma))


def decode(dec: Decoder, z: torch.Tensor, out: torch.Tensor | None = None, backend: str = "auto",
           cudnn_benchmark: bool = False) -> torch.Tensor:
    """z: (B, 16, T, h, w) -> the raw decode (B, T', H, W, C) in z's dtype (ComfyUI's
    first_stage_model.decode(z).movedim(1, -1), before process_output). `out` may be given."""
    if z.ndim != 5:
        raise ValueError(f"the Wan VAE decodes (batch, channels, frames, height, width) latents, got {tuple(z.shape)}")
    b, c, t, h, w = z.shape
    if c != dec.z_conv.shape[1] or t < 1:
        raise ValueError(f"latent {tuple(z.shape)}: this VAE takes {dec.z_conv.shape[1]} channels and >= 1 frame")
    if z.dtype != dec.z_conv.dtype or z.device != dec.z_conv.device:
        raise ValueError(f"latent is {z.dtype} on {z.device}, the decoder's weights {dec.z_conv.dtype} on "
                         f"{dec.z_conv.device}: move the latent first")
    scale = 2 ** dec.spatial_ups
    shape = (b, dec.frames_out(t), h * scale, w * scale, dec.out_channels)
    if out is None:
        out = torch.empty(shape, device=z.device, dtype=z.dtype)
    elif tuple(out.shape) != shape:
        raise ValueError(f"out must be {shape}, got {tuple(out.shape)}")
    flags = (torch.backends.cudnn.flags(enabled=True, benchmark=True) if cudnn_benchmark and z.is_cuda
             else contextlib.nullcontext())
    with torch.inference_mode(), flags:
        for i in range(b):
            zi = z[i:i + 1].contiguous(memory_format=CL3D)
            # the VAE's conv2 is 1x1x1: one matrix product over all latent voxels
            zc = torch.addmm(dec.z_bias, rows(zi), dec.z_conv.t()).view(1, t, h, w, -1).permute(0, 4, 1, 2, 3)
            stream = _Stream(backend)
            f0 = 0
            for j in range(t):
                y = stream.chunk(dec, zc[:, :, j:j + 1], first=j == 0)
                n = y.shape[2]
                out[i, f0:f0 + n].copy_(y[0, :dec.rgb].permute(1, 2, 3, 0))
                f0 += n
            del stream
    return out
