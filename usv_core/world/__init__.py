"""USV World: a procedural video world whose rules we know, a score that checks them, and the tiny
Wan-architecture models (VAE, DiT, caption encoder) trained on it.

    frames, caption = make_clip(seed)   # (33, 256, 256, 3) float in [0, 1], "a red circle and ..."
    score(frames, caption)              # in [0, 1]

Model definitions here are for training and reference; ComfyUI loads the saved weights with its
own Wan code (usv_core never imports comfy)."""

from .scene import FRAMES, SIZE, Scene, WorldObject, make_batch, make_clip, render, sample_scene, tracks
from .score import score, score_details
from .vocab import COLOR_NAMES, COLORS, SHAPES, caption_for, parse_caption

__all__ = [
    "FRAMES", "SIZE", "Scene", "WorldObject", "make_batch", "make_clip", "render", "sample_scene", "tracks",
    "score", "score_details", "COLOR_NAMES", "COLORS", "SHAPES", "caption_for", "parse_caption",
]
