"""Tiny models written as GGUF files, the way ComfyUI-GGUF's tools/convert.py lays out a real
checkpoint, so that its UnetLoaderGGUF detects and loads them like a downloaded quantized Wan.

Layout rules taken from convert.py (ModelWan): architecture string "wan"; 1-D tensors, tensors of
at most 1024 elements and ".modulation" tables stay F32; everything else is quantized. Wan's
patch embedding is a 5-D Conv3d weight, which GGUF's quantizers cannot take: convert.py leaves it
out and tools/fix_5d_tensors.py adds it back unquantized in F32, as done here in one pass.
Needs the `gguf` package (ComfyUI-GGUF's own dependency), imported only when called.
"""

from __future__ import annotations

import os

import torch

from . import runtime, tiny_models

QUANTIZATION_THRESHOLD = 1024  # convert.py: smaller tensors stay F32
HIGH_PRECISION_KEYS = (".modulation",)  # convert.py's ModelWan.keys_hiprec
MAX_QUANT_DIMS = 4


def write_gguf(path: str, state_dict: dict[str, torch.Tensor], qtype: str = "Q8_0", arch: str = "wan") -> dict[str, str]:
    """Write `state_dict` as a GGUF file at `path`; returns the quantization type of each key."""
    import gguf

    target = gguf.GGMLQuantizationType[qtype]
    block, _ = gguf.GGML_QUANT_SIZES[target]
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if target == gguf.GGMLQuantizationType.Q8_0
                         else gguf.LlamaFileType.MOSTLY_F16)
    types = {}
    for key, tensor in state_dict.items():
        data = tensor.detach().to(torch.float32).numpy()
        kind = target
        if (data.ndim <= 1 or data.size <= QUANTIZATION_THRESHOLD or data.ndim > MAX_QUANT_DIMS
                or any(k in key for k in HIGH_PRECISION_KEYS)):
            kind = gguf.GGMLQuantizationType.F32
        elif data.shape[-1] % block:
            kind = gguf.GGMLQuantizationType.F16  # convert.py's fallback when a row does not fill blocks
        writer.add_tensor(key, gguf.quants.quantize(data, kind), raw_dtype=kind)
        types[key] = kind.name
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def tiny_wan_t2v_gguf(seed: int = 0, qtype: str = "Q8_0", **cfg) -> str:
    """File name (under diffusion_models, which ComfyUI-GGUF's unet_gguf list reads) of the tiny
    random Wan 2.1 T2V of harness/tiny_models.py, quantized to `qtype`."""
    tag = "-".join(f"{k}{v}" for k, v in sorted(cfg.items()))
    name = f"tiny_wan21_t2v_s{seed}{'-' + tag if tag else ''}-{qtype}.gguf"
    path = runtime.model_path("diffusion_models", name)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        partial = path + ".partial"
        write_gguf(partial, tiny_models.wan21_t2v_state_dict(seed, **cfg), qtype)
        os.replace(partial, path)
    return name
