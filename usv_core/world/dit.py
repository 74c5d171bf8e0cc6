"""A Wan 2.1 text-to-video DiT, written for training, whose state dict is exactly what ComfyUI's
Wan loader expects: it detects "wan2.1" t2v from head.modulation, reads dim, ffn_dim, layer count
and in/out channels from the weights, and assumes head dim 128 (heads = dim // 128), patch
(1, 2, 2), frequency dim 256, text dim 4096, qk-norm and cross-attention norm on.

Flow-matching convention as in ComfyUI's Wan: the model gets x_t = (1 - s) x0 + s noise and the
timestep 1000 s, and predicts the velocity noise - x0."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_DIM = 128
FREQ_DIM = 256
TEXT_DIM = 4096
PATCH = (1, 2, 2)
EPS = 1e-6


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM) -> torch.Tensor:
    """Wan's sinusoidal timestep features: [cos, sin] of t * 10000^(-i / half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = torch.outer(t.float().flatten(), freqs)
    return torch.cat([torch.cos(ang), torch.sin(ang)], dim=1)


def rope_tables(grid: tuple[int, int, int], head_dim: int = HEAD_DIM, theta: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (N, head_dim / 2), for tokens in raster order over a (T, H, W) grid.
    The head dim is split over the axes as Wan does: t gets d - 4 (d // 6), h and w 2 (d // 6)
    each; pairs of channels (2i, 2i + 1) rotate together."""
    axes = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
    t, h, w = grid
    pos = torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 3).to(device, torch.float64)
    angles = []
    for i, d in enumerate(axes):
        omega = 1.0 / theta ** torch.linspace(0, (d - 2) / d, d // 2, dtype=torch.float64, device=device)
        angles.append(pos[:, i : i + 1] * omega)
    ang = torch.cat(angles, -1).float()
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, N, heads, D): rotate each channel pair (2i, 2i + 1) by its angle (in float32)."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = nn.RMSNorm(dim, eps=EPS)
        self.norm_k = nn.RMSNorm(dim, eps=EPS)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, n, _ = x.shape
        q = apply_rope(self.norm_q(self.q(x)).view(b, n, self.heads, -1), *rope)
        k = apply_rope(self.norm_k(self.k(x)).view(b, n, self.heads, -1), *rope)
        v = self.v(x).view(b, n, self.heads, -1)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class CrossAttention(SelfAttention):
    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        b, n, _ = x.shape
        q = self.norm_q(self.q(x)).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.norm_k(self.k(context)).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, n, -1))


class Block(nn.Module):
    """Self-attention, cross-attention to the text, feed-forward; adaLN from the timestep."""

    def __init__(self, dim: int, ffn_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, EPS, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, heads)
        self.norm3 = nn.LayerNorm(dim, EPS, elementwise_affine=True)
        self.cross_attn = CrossAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, EPS, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.zeros(1, 6, dim))

    def forward(self, x, e, rope, context):
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.unsqueeze(0) + e).unbind(2)  # each (B, 1, dim)
        x = x + self.self_attn(self.norm1(x) * (1 + scale1) + shift1, rope) * gate1
        x = x + self.cross_attn(self.norm3(x), context)
        return x + self.ffn(self.norm2(x) * (1 + scale2) + shift2) * gate2


class Head(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, EPS, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(PATCH) * out_dim)
        self.modulation = nn.Parameter(torch.zeros(1, 2, dim))

    def forward(self, x, e):
        shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + scale) + shift)


class WanDiT(nn.Module):
    def __init__(self, dim: int = 256, ffn_dim: int = 1024, num_layers: int = 4, in_dim: int = 16, out_dim: int = 16):
        super().__init__()
        assert dim % HEAD_DIM == 0, "ComfyUI derives heads = dim // 128: dim must be a multiple of 128"
        self.dim, self.out_dim, self.heads = dim, out_dim, dim // HEAD_DIM
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=PATCH, stride=PATCH)
        self.text_embedding = nn.Sequential(nn.Linear(TEXT_DIM, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(FREQ_DIM, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList([Block(dim, ffn_dim, self.heads) for _ in range(num_layers)])
        self.head = Head(dim, out_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT-style start: small linear weights, and zero for what writes into the residual
        stream's modulation and the output, so that training begins from a calm identity."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.time_projection[1].weight)
        nn.init.zeros_(self.head.head.weight)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, 16, T, H, W) normalised latents, timestep (B,) in [0, 1000], context (B, L, 4096)
        -> velocity (B, 16, T, H, W). H and W must be even (the patch is 2 x 2)."""
        x, grid, e, e0, context, rope = self.embed(x, timestep, context)
        for block in self.blocks:
            x = block(x, e0, rope, context)
        return self.output(x, e, grid)

    def embed(self, x, timestep, context):
        """What the blocks take: tokens (B, N, dim), the token grid, the time embedding e and its
        per-block modulation e0, the embedded context and the rope tables."""
        b = x.shape[0]
        x = self.patch_embedding(x.float()).to(x.dtype)
        grid = tuple(x.shape[2:])
        x = x.flatten(2).transpose(1, 2)
        e = self.time_embedding(timestep_features(timestep).to(x.dtype)).view(b, 1, self.dim)
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        context = self.text_embedding(context.to(x.dtype))
        return x, grid, e, e0, context, rope_tables(grid, device=x.device)

    def output(self, x, e, grid) -> torch.Tensor:
        """The head on the blocks' tokens, unpatchified: (B, N, dim) -> (B, c, T p, H q, W r)."""
        b = x.shape[0]
        x = self.head(x, e)
        gt, gh, gw = grid
        x = x.view(b, gt, gh, gw, *PATCH, self.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(b, self.out_dim, gt * PATCH[0], gh * PATCH[1], gw * PATCH[2])


def set_compiled(dit: WanDiT, on: bool) -> None:
    """Compile one block, not the whole model: the blocks share the compiled code (their weights
    are its inputs), so compiling takes seconds instead of a minute and most of the step's small
    elementwise kernels (norms, modulation, rotary embedding) still fuse."""
    for b in dit.blocks:
        if on:
            b.compile()
        else:
            b._compiled_call_impl = None
