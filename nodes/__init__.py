"""ComfyUI adapters: node classes, model patching and per-model adapters."""

import logging

from comfy_api.latest import ComfyExtension, io


def all_nodes() -> list[type[io.ComfyNode]]:
    # Imported here so that a failure in one module names itself instead of hiding the pack.
    from .accelerate import USVAccelerate
    from .dmd import USVDMDSampler, USVDMDSigmas
    from .model_info import USVModelInfo
    from .multigpu import USVSequenceParallel
    from .policy import USVPolicy
    from .report import USVReport
    from .sparse_attention import USVSparseAttention
    from .token_merge import USVTokenMerge
    from .vae_decode import USVVAEDecode
    from .world import USVWorldPrompt

    return [
        USVModelInfo,
        USVSparseAttention,
        USVTokenMerge,
        USVDMDSigmas,
        USVDMDSampler,
        USVWorldPrompt,
        USVPolicy,
        USVAccelerate,
        USVReport,
        USVVAEDecode,
        USVSequenceParallel,
    ]


def log_backend() -> None:
    """Say once, at load, when a CUDA machine lacks triton and what runs instead."""
    from ..usv_core.attention import missing_triton_note

    note = missing_triton_note()
    if note:
        logging.getLogger("usv").warning("USV: %s", note)


class USVExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        # called once as ComfyUI loads the pack, on every release (on_load only from 0.4)
        log_backend()
        return all_nodes()
