"""The gated coarse branch of VSA-trained checkpoints (FastWan): per block, a linear layer
`to_gate_compress` turns the self-attention input into a gate, and attention becomes
fine + gate * coarse. Stock ComfyUI drops these weights when it loads such a checkpoint, so USV
reads them from the file itself."""

from __future__ import annotations

import re

import torch
from safetensors import safe_open

_KEY = re.compile(r"(?:^|\.)blocks\.(\d+)\.(?:[\w.]*\.)?to_gate_compress\.(weight|bias)$")


class GateWeights:
    """to_gate_compress weight and bias for each block, moved to the compute device on first use."""

    def __init__(self, per_block: dict[int, tuple[torch.Tensor, torch.Tensor | None]], source: str):
        self.per_block = per_block
        self.source = source
        self._cache: dict = {}

    def for_block(self, block: int, like: torch.Tensor):
        key = (block, like.device, like.dtype)
        if key not in self._cache:
            w, b = self.per_block[block]
            self._cache[key] = (w.to(like.device, like.dtype), None if b is None else b.to(like.device, like.dtype))
        return self._cache[key]


def load_gate_weights(path: str, layers: int, dim: int) -> GateWeights:
    """Read every block's to_gate_compress from a safetensors file; a clear error when the file
    has none, misses blocks, or does not fit the model."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    with safe_open(path, framework="pt", device="cpu") as f:
        for key in f.keys():
            m = _KEY.search(key)
            if m:
                found.setdefault(int(m.group(1)), {})[m.group(2)] = f.get_tensor(key)
    name = path.replace("\\", "/").rsplit("/", 1)[-1]
    if not found:
        raise ValueError(f"gate_weights: {name} holds no to_gate_compress weights; choose the VSA-trained "
                         f"checkpoint (FastWan) that the model came from, or 'none'")
    missing = [i for i in range(layers) if "weight" not in found.get(i, {})]
    if missing:
        raise ValueError(f"gate_weights: {name} has no to_gate_compress for blocks {missing[:5]}; "
                         f"this model has {layers} blocks")
    per_block = {}
    for i in range(layers):
        w = found[i]["weight"]
        if tuple(w.shape) != (dim, dim):
            raise ValueError(f"gate_weights: {name} gates are {tuple(w.shape)} but this model's width is {dim}; "
                             f"it belongs to another model")
        per_block[i] = (w, found[i].get("bias"))
    return GateWeights(per_block, name)


def wan_attention_input(block, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
    """What a Wan block feeds its self-attention: norm1(x) modulated by shift e0 and scale e1."""
    mod = block.modulation.to(device=x.device, dtype=x.dtype)
    if vec.ndim < 4:
        shift, scale = (mod + vec).chunk(6, dim=1)[:2]
    else:  # per-frame modulation (Wan 2.2 5B), already spread to tokens when merged
        e = (mod.unsqueeze(0) + vec).unbind(2)
        shift, scale = e[0], e[1]
        if shift.shape[1] != x.shape[1]:
            shift, scale = (torch.repeat_interleave(t, x.shape[1] // t.shape[1], dim=1) for t in (shift, scale))
    return torch.addcmul(shift, block.norm1(x), 1 + scale)


def gate_for_block(gates: GateWeights, block_index: int, block, x: torch.Tensor, vec: torch.Tensor, heads: int):
    """(B, heads, N, D) gate of one block's self-attention."""
    h = wan_attention_input(block, x, vec)
    w, b = gates.for_block(block_index, h)
    g = torch.nn.functional.linear(h, w, b)
    bsz, n, dim = g.shape
    return g.view(bsz, n, heads, dim // heads).transpose(1, 2)
