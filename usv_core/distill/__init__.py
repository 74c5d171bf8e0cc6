"""Sparse DMD2 distillation for flow-matching DiTs in the Wan 2.1 layout (USV World's first; a real
Wan checkpoint fits the same loop): a few-step student that runs VSA and token merging in its
forward, as it will be sampled, against the frozen teacher's CFG score and an online fake score.

    python3 -m usv_core.distill --out DIR            # one GPU; the same command resumes
    torchrun --nproc-per-node 8 -m usv_core.distill --out DIR --teacher wan2.1_t2v_1.3B.safetensors ...

Modules: config (the recipe's settings), data (conditioning), student (the sparse forward), losses
(DMD2), models (teacher, fake, student), dist (torch.distributed, FSDP2), checkpoint (resumable
state), loop (the training loop), export (full model or LoRA for ComfyUI). See docs/distill.md."""

from .config import Config, from_args
from .student import DENSE, SparseWanDiT, Sparsity

__all__ = ["Config", "from_args", "Sparsity", "SparseWanDiT", "DENSE"]
