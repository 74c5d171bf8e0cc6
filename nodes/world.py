"""USV World in ComfyUI: the caption encoder as a node, and the pack's models/ folders as search
paths so that UNETLoader and VAELoader list the embedded world model."""

from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

from ..usv_core.world import weights

log = logging.getLogger("usv.world")
_ENCODERS: dict[tuple[str, float], object] = {}


def register_model_folders() -> None:
    """Add models/diffusion_models and models/vae of this pack to ComfyUI's search paths (after the
    user's own folders), so that usv_world_dit.safetensors and usv_world_vae.safetensors appear
    in UNETLoader and VAELoader."""
    import folder_paths

    for kind in ("diffusion_models", "vae", "text_encoders"):
        path = os.path.join(weights.MODELS_DIR, kind)
        if os.path.isdir(path):
            folder_paths.add_model_folder_path(kind, path, is_default=False)


def caption_encoder(path: str | None = None):
    """The world's caption encoder, loaded once per file version."""
    path = path or weights.default_path(weights.TEXT_FILE)
    key = (path, os.path.getmtime(path))
    if key not in _ENCODERS:
        _ENCODERS.clear()
        _ENCODERS[key] = weights.load_text(path)
    return _ENCODERS[key]


class USVWorldPrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="USVWorldPrompt",
            display_name="USV World Prompt",
            category="USV/world",
            description="Text conditioning for the embedded USV World model (usv_world_dit + usv_world_vae): "
                        "1-3 objects, each a colour (red, green, blue, yellow, white, purple) and a shape "
                        "(circle, square, triangle), e.g. 'a red circle and a blue square'. Other words are "
                        "ignored with a warning. An empty prompt gives the unconditional (negative) input.",
            inputs=[
                io.String.Input("prompt", multiline=True, default="a red circle and a blue square",
                                tooltip="Empty for the negative/unconditional input of CFG."),
            ],
            outputs=[io.Conditioning.Output()],
        )

    @classmethod
    def execute(cls, prompt: str) -> io.NodeOutput:
        with torch.no_grad():
            cond = caption_encoder().encode(prompt or "").float().cpu()
        return io.NodeOutput([[cond, {}]])


register_model_folders()
