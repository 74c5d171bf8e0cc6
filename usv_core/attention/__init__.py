"""Video Sparse Attention: cube-level selection plus exact block-sparse attention.

CUDA tensors run Triton kernels (forward and backward, torch.compile-safe custom ops);
anything else runs the PyTorch reference in `reference.py`, which is the definition.
"""

from .api import (
    TRITON_DTYPES,
    TRITON_HEAD_DIMS,
    block_sparse_attention,
    missing_triton_note,
    supports,
    vsa_attention,
    vsa_attention_blocked,
)
from .joint import vsa_attention_joint

__all__ = [
    "missing_triton_note",
    "vsa_attention",
    "vsa_attention_blocked",
    "vsa_attention_joint",
    "block_sparse_attention",
    "supports",
    "TRITON_DTYPES",
    "TRITON_HEAD_DIMS",
]
