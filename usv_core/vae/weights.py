"""The Wan 2.1 VAE decoder's weights, read from the VAE's state dict into the layouts the fast
decode runs in: convolutions channels-last, 1x1 convolutions as matrices, RMS_norm's gamma
times sqrt(C) in float32. Wan 2.2's A14B models use this VAE; the 5B's (48 latent channels,
nested up blocks) is another architecture and is refused with the reason."""

from __future__ import annotations

from dataclasses import dataclass

import torch

CL3D = torch.channels_last_3d


@dataclass
class Conv:
    weight: torch.Tensor  # (out, in, kt, kh, kw) channels_last_3d
    bias: torch.Tensor | None
    context: int  # frames before the chunk a causal conv reads (kt - 1)
    pad: tuple[int, int]  # spatial zero padding (h, w)


@dataclass
class ResBlock:
    gamma1: torch.Tensor
    conv1: Conv  # runs without its bias: the next norm adds it
    gamma2: torch.Tensor
    conv2: Conv  # its bias holds the shortcut's bias too
    shortcut: torch.Tensor | None  # (in, out), transposed for addmm; None: identity


@dataclass
class AttnBlock:
    gamma: torch.Tensor
    qkv: torch.Tensor  # (3C, C)
    qkv_bias: torch.Tensor
    proj: torch.Tensor  # (C, C)
    proj_bias: torch.Tensor


@dataclass
class Upsample:
    temporal: Conv | None  # upsample3d: the (3, 1, 1) causal conv making two frames of each
    conv: torch.Tensor  # (4 out, in, 2, 2) channels_last: the sub-pixel form of nearest 2x + 3x3 conv
    bias: torch.Tensor  # (4 out,)


# Nearest 2x then a 3x3 conv: output row 2i + a reads upsampled rows 2i + a - 1 .. 2i + a + 1, which
# are input rows i - 1, i, i (a = 0) or i, i, i + 1 (a = 1). So each of the four output phases
# (a, b) is a 2x2 conv on the input whose taps are sums of the 3x3 taps: 2.25x fewer FLOPs and no
# upsampled tensor. With padding 1, phase a's 2x2 window at output row o covers rows o - 1, o:
# phase 0 sits at o = i, phase 1 at o = i + 1.
_PHASE = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]],   # a = 0: taps (i - 1, i) from 3x3 rows (0, 1 + 2)
                       [[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])  # a = 1: taps (i, i + 1) from rows (0 + 1, 2)


def subpixel(weight: torch.Tensor, bias: torch.Tensor, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in, 3, 3) -> (4 * out, in, 2, 2), phases in the order (a, b) = (0, 0), (0, 1), (1, 0),
    (1, 1); the taps are summed in float32 and rounded once."""
    w = weight.float()
    r = _PHASE.to(w.device)
    k = torch.einsum("ayk,bxl,oikl->aboiyx", r, r, w)  # (2, 2, out, in, 2, 2)
    k = k.reshape(4 * w.shape[0], w.shape[1], 2, 2)
    return (k.to(device, dtype).contiguous(memory_format=torch.channels_last), bias.to(device, dtype).repeat(4))


@dataclass
class Decoder:
    z_conv: torch.Tensor  # the VAE's conv2 (1x1x1 on z) as (out, in)
    z_bias: torch.Tensor
    conv1: Conv
    middle: list
    ups: list
    head_gamma: torch.Tensor
    head: Conv  # output channels padded with zero filters to a multiple of 8
    rgb: int  # the real output channels

    @property
    def temporal_ups(self) -> int:
        return sum(1 for u in self.ups if isinstance(u, Upsample) and u.temporal is not None)

    @property
    def spatial_ups(self) -> int:
        return sum(1 for u in self.ups if isinstance(u, Upsample))

    @property
    def out_channels(self) -> int:
        return self.rgb

    def frames_out(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * 2 ** self.temporal_ups


REQUIRED = ("conv2.weight", "decoder.conv1.weight", "decoder.head.0.gamma", "decoder.head.2.weight",
            "decoder.middle.0.residual.0.gamma", "decoder.upsamples.0.residual.0.gamma")


def why_not(sd: dict) -> str | None:
    """Why this state dict is not a Wan 2.1 VAE the fast decode serves; None when it is."""
    if "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd:
        return "the Wan 2.2 5B VAE (48 latent channels) has other up blocks"
    missing = [k for k in REQUIRED if k not in sd]
    if missing:
        return f"not a Wan 2.1 VAE (no {missing[0]})"
    return None


def _conv(sd, prefix, device, dtype, bias=True) -> Conv:
    w = sd[prefix + ".weight"]
    kt, kh, kw = w.shape[2:]
    return Conv(weight=w.to(device, dtype).contiguous(memory_format=CL3D),
                bias=sd[prefix + ".bias"].to(device, dtype) if bias else None,
                context=kt - 1, pad=(kh // 2, kw // 2))


def _gamma(sd, key, device) -> torch.Tensor:
    g = sd[key].reshape(-1).to(device, torch.float32)
    return g * g.numel() ** 0.5


def _res(sd, p, device, dtype) -> ResBlock:
    conv1 = _conv(sd, p + ".residual.2", device, dtype)
    conv2 = _conv(sd, p + ".residual.6", device, dtype)
    short = None
    if p + ".shortcut.weight" in sd:
        w = sd[p + ".shortcut.weight"]
        short = w.reshape(w.shape[0], w.shape[1]).t().to(device, dtype)
        # one bias add: the shortcut's is folded into conv2's, both are added to the same sum
        conv2.bias = (sd[p + ".residual.6.bias"].float() + sd[p + ".shortcut.bias"].float()).to(device, dtype)
    return ResBlock(gamma1=_gamma(sd, p + ".residual.0.gamma", device), conv1=conv1,
                    gamma2=_gamma(sd, p + ".residual.3.gamma", device), conv2=conv2, shortcut=short)


def _attn(sd, p, device, dtype) -> AttnBlock:
    def mat(k):
        w = sd[k]
        return w.reshape(w.shape[0], w.shape[1]).to(device, dtype)

    return AttnBlock(gamma=_gamma(sd, p + ".norm.gamma", device), qkv=mat(p + ".to_qkv.weight"),
                     qkv_bias=sd[p + ".to_qkv.bias"].to(device, dtype), proj=mat(p + ".proj.weight"),
                     proj_bias=sd[p + ".proj.bias"].to(device, dtype))


def _block(sd, p, device, dtype):
    if p + ".residual.0.gamma" in sd:
        return _res(sd, p, device, dtype)
    if p + ".to_qkv.weight" in sd:
        return _attn(sd, p, device, dtype)
    if p + ".resample.1.weight" in sd:
        temporal = _conv(sd, p + ".time_conv", device, dtype) if p + ".time_conv.weight" in sd else None
        conv, bias = subpixel(sd[p + ".resample.1.weight"], sd[p + ".resample.1.bias"], device, dtype)
        return Upsample(temporal=temporal, conv=conv, bias=bias)
    raise ValueError(f"unknown Wan VAE decoder block at {p}")


def load(sd: dict, device, dtype) -> Decoder:
    """The decoder of a Wan 2.1 VAE state dict (ComfyUI's key names), on `device` in `dtype`."""
    reason = why_not(sd)
    if reason:
        raise ValueError(f"USV VAE decode serves the Wan 2.1 VAE only: {reason}")
    n_ups = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.upsamples."))
    zc = sd["conv2.weight"]
    return Decoder(
        z_conv=zc.reshape(zc.shape[0], zc.shape[1]).to(device, dtype), z_bias=sd["conv2.bias"].to(device, dtype),
        conv1=_conv(sd, "decoder.conv1", device, dtype),
        middle=[_block(sd, f"decoder.middle.{i}", device, dtype) for i in range(3)],
        ups=[_block(sd, f"decoder.upsamples.{i}", device, dtype) for i in range(n_ups)],
        head_gamma=_gamma(sd, "decoder.head.0.gamma", device),
        head=_padded(_conv(sd, "decoder.head.2", device, dtype)), rgb=sd["decoder.head.2.weight"].shape[0])


def _padded(conv: Conv, multiple: int = 8) -> Conv:
    """3 output channels in channels-last memory keep a conv off tensor-core kernels (bf16 wants
    channel counts in multiples of 8); zero filters make the padding, and they are dropped after."""
    out = conv.weight.shape[0]
    pad = -out % multiple
    if pad == 0:
        return conv
    w = torch.cat([conv.weight, conv.weight.new_zeros((pad, *conv.weight.shape[1:]))])
    b = torch.cat([conv.bias, conv.bias.new_zeros(pad)])
    return Conv(weight=w.contiguous(memory_format=CL3D), bias=b, context=conv.context, pad=conv.pad)
