"""A causal video VAE with Wan 2.1's architecture (16 latent channels, 8x spatial and 4x temporal
compression), written for training: whole clips at once instead of Wan's chunk-by-chunk cache.

Parameter names and shapes are exactly those of Wan 2.1's VAE, so ComfyUI's VAELoader reads the
saved state dict (it takes the base width from decoder.head.0.gamma, so a small `dim` works).
Wan encodes frame 0 alone and then 4 frames at a time with a cache of past frames; every causal
convolution here sees the same past, so running the whole clip gives the same numbers:
- a temporal downsample keeps frame 0 as it is and runs its stride-2 convolution over all frames;
- a temporal upsample keeps frame 0 as it is and turns each later frame into two, its causal
  convolution seeing zeros, not frame 0, before frame 1."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

Z_DIM = 16
DIM_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
TEMPORAL_DOWN = (False, True, True)


def frames_to_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, C, T, H, W) -> (B T, C, H, W), for layers that work on single frames."""
    b, c, t, h, w = x.shape
    return x.transpose(1, 2).reshape(b * t, c, h, w)


def batch_to_frames(x: torch.Tensor, t: int) -> torch.Tensor:
    bt, c, h, w = x.shape
    return x.reshape(bt // t, t, c, h, w).transpose(1, 2)


class CausalConv3d(nn.Conv3d):
    """Conv3d that pads only the past in time, so frame t never sees frame t + 1."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        pt, ph, pw = self.padding
        self.causal_pad = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.causal_pad))


class RMS_norm(nn.Module):
    """Channel RMS norm (L2-normalise over channels, times sqrt(C) and a learned gain)."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma.to(x)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False), nn.SiLU(), nn.Dropout(0.0), CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(frames_to_batch(x))
        q, k, v = (z.flatten(2).transpose(1, 2).unsqueeze(1) for z in self.to_qkv(y).chunk(3, dim=1))  # (n, 1, hw, c)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return x + batch_to_frames(self.proj(y), t)


class Resample(nn.Module):
    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def _spatial(self, x: torch.Tensor) -> torch.Tensor:
        return batch_to_frames(self.resample(frames_to_batch(x)), x.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "upsample3d" and x.shape[2] > 1:
            later = self.time_conv(x[:, :, 1:])  # (b, 2c, t-1, h, w): two frames per input frame
            b, c2, t1, h, w = later.shape
            later = later.view(b, 2, c2 // 2, t1, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t1, h, w)
            x = torch.cat([x[:, :, :1], later], dim=2)
        x = self._spatial(x)
        if self.mode == "downsample3d" and x.shape[2] > 1:
            x = torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        return x


class Encoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int):
        super().__init__()
        dims = [dim * u for u in (1,) + DIM_MULT]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(NUM_RES_BLOCKS):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(DIM_MULT) - 1:
                layers.append(Resample(cout, "downsample3d" if TEMPORAL_DOWN[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*layers)
        self.middle = nn.Sequential(ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]), ResidualBlock(dims[-1], dims[-1]))
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], z_dim, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.middle(self.downsamples(self.conv1(x))))


class Decoder3d(nn.Module):
    def __init__(self, dim: int, z_dim: int):
        super().__init__()
        dims = [dim * u for u in (DIM_MULT[-1],) + DIM_MULT[::-1]]
        temporal_up = TEMPORAL_DOWN[::-1]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0]))
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:  # the upsample before halved the channels
                cin = cin // 2
            for _ in range(NUM_RES_BLOCKS + 1):
                layers.append(ResidualBlock(cin, cout))
                cin = cout
            if i != len(DIM_MULT) - 1:
                layers.append(Resample(cout, "upsample3d" if temporal_up[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*layers)
        self.head = nn.Sequential(RMS_norm(dims[-1], images=False), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.head(self.upsamples(self.middle(self.conv1(z))))


class WanVAE(nn.Module):
    """encode: (B, 3, 1 + 4k, H, W) in [-1, 1] -> (B, 16, 1 + k, H/8, W/8) raw latents (the mean);
    decode: the reverse. ComfyUI normalises raw latents with Wan 2.1's fixed per-channel mean and
    std before the DiT sees them (see latent_norm)."""

    def __init__(self, dim: int = 16, z_dim: int = Z_DIM):
        super().__init__()
        self.dim, self.z_dim = dim, z_dim
        self.encoder = Encoder3d(dim, z_dim * 2)
        self.conv1 = CausalConv3d(z_dim * 2, z_dim * 2, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = Decoder3d(dim, z_dim)

    @torch.no_grad()
    def init_for_training(self) -> None:
        """Start as a plain per-frame autoencoder, which trains much faster from scratch: every
        residual branch ends in zeros (blocks pass their input through), a temporal downsample
        averages the two new frames of its window, a temporal upsample repeats its frame."""
        for m in self.modules():
            if isinstance(m, ResidualBlock):
                nn.init.zeros_(m.residual[6].weight)
                nn.init.zeros_(m.residual[6].bias)
            elif isinstance(m, Resample) and hasattr(m, "time_conv"):
                w, b = m.time_conv.weight, m.time_conv.bias  # (out, in, 3, 1, 1)
                w.zero_()
                b.zero_()
                eye = torch.eye(w.shape[1])
                if m.mode == "downsample3d":
                    w[:, :, 1, 0, 0] = 0.5 * eye
                    w[:, :, 2, 0, 0] = 0.5 * eye
                else:
                    w[: w.shape[1], :, 2, 0, 0] = eye
                    w[w.shape[1] :, :, 2, 0, 0] = eye

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv1(self.encoder(x))[:, : self.z_dim]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.conv2(z))

    @torch.no_grad()
    def fold_latent_affine(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        """Make the encoder emit scale * z + shift (per channel) and the decoder expect it, without
        changing what decode(encode(x)) computes: both 1x1 convolutions absorb the map."""
        s, b = scale.to(self.conv1.weight), shift.to(self.conv1.weight)
        zd = self.z_dim
        self.conv1.weight[:zd] *= s.view(-1, 1, 1, 1, 1)
        self.conv1.bias[:zd] = self.conv1.bias[:zd] * s + b
        w = self.conv2.weight  # (out, in, 1, 1, 1); input z_old = (z_new - b) / s
        self.conv2.bias -= (w[:, :, 0, 0, 0] * (b / s).view(1, -1)).sum(1)
        w /= s.view(1, -1, 1, 1, 1)


# Wan 2.1's latent statistics, which ComfyUI's Wan21 latent format applies to every VAE it pairs
# with a Wan model: the DiT sees (z - mean) / std.
WAN21_LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                     0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


def latent_norm(z: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """Raw VAE latents (B, 16, T, H, W) <-> what the DiT sees, as ComfyUI's Wan21 format does."""
    mean = torch.tensor(WAN21_LATENT_MEAN, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    std = torch.tensor(WAN21_LATENT_STD, device=z.device, dtype=z.dtype).view(1, -1, 1, 1, 1)
    return z * std + mean if inverse else (z - mean) / std
