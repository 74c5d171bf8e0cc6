"""One place per model family: how to recognise it inside a ComfyUI MODEL, and the facts USV needs
(patch size, layers, heads, head dim). Detection goes by class names, never by importing a model
module, so that ComfyUI versions that lack a family still load the pack."""

from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_FAMILIES = ("Wan 2.1", "Wan 2.2", "HunyuanVideo", "LTX-Video")


@dataclass(frozen=True)
class ModelFacts:
    family: str  # one of SUPPORTED_FAMILIES or "unknown"
    variant: str | None
    patch_size: tuple[int, int, int] | None
    layers: int | None
    heads: int | None
    head_dim: int | None
    supported: bool
    reason: str  # why not, when not supported; a short note otherwise

    def summary(self) -> str:
        lines = [f"architecture: {self.family}" + (f" ({self.variant})" if self.variant else "")]
        if self.patch_size is not None:
            lines.append("patch size: " + "x".join(str(p) for p in self.patch_size))
        if self.layers is not None:
            lines.append(f"layers: {self.layers}")
        if self.heads is not None:
            lines.append(f"heads: {self.heads}, head dim: {self.head_dim}")
        lines.append(("USV can patch it" if self.supported else "USV cannot patch it") + f": {self.reason}")
        return "\n".join(lines)


def _class_names(obj) -> set[str]:
    return {c.__name__ for c in type(obj).__mro__}


def _unknown(name: str, reason: str) -> ModelFacts:
    return ModelFacts("unknown", name, None, None, None, None, False, reason)


def _wan(dm, config_name: str) -> ModelFacts:
    variants = {
        "WAN21_T2V": ("Wan 2.1", "t2v"),
        "WAN21_I2V": ("Wan 2.1", "i2v"),
        "WAN21_FunControl2V": ("Wan 2.1", "fun control"),
        "WAN21_Camera": ("Wan 2.1", "camera"),
        "WAN21_Vace": ("Wan 2.1", "vace"),
        "WAN21_HuMo": ("Wan 2.1", "humo"),
        "WAN22_T2V": ("Wan 2.2", "ti2v 5B"),
        "WAN22_Camera": ("Wan 2.2", "camera"),
        "WAN22_S2V": ("Wan 2.2", "s2v"),
        "WAN22_Animate": ("Wan 2.2", "animate"),
    }
    family, variant = variants.get(config_name, ("Wan 2.1", None))
    heads = int(dm.num_heads)
    head_dim = int(dm.dim) // heads
    facts = dict(family=family, variant=variant, patch_size=tuple(int(p) for p in dm.patch_size),
                 layers=len(dm.blocks), heads=heads, head_dim=head_dim)
    if variant in ("t2v", "i2v", "ti2v 5B"):
        return _check(**facts)
    return ModelFacts(**facts, supported=False,
                      reason=f"the {variant} variant adds tokens USV has no adapter for yet; supported: t2v, i2v, ti2v 5B")


def _hunyuan(dm, config_name: str) -> ModelFacts:
    heads = int(dm.num_heads)
    variant = {"HunyuanVideo": "t2v", "HunyuanVideoI2V": "i2v", "HunyuanVideoSkyreelsI2V": "skyreels i2v",
               "HunyuanVideo15": "1.5", "HunyuanVideo15_SR_Distilled": "1.5 super-resolution",
               "HunyuanImage21": "image 2.1", "HunyuanImage21Refiner": "image 2.1 refiner"}.get(config_name)
    return _check(family="HunyuanVideo", variant=variant, patch_size=tuple(int(p) for p in dm.patch_size),
                  layers=len(dm.double_blocks) + len(dm.single_blocks), heads=heads,
                  head_dim=int(dm.hidden_size) // heads)


def _ltxv(dm, config_name: str) -> ModelFacts:
    block = dm.transformer_blocks[0].attn1
    heads = int(block.heads)
    return _check(family="LTX-Video", variant=None, patch_size=(1, 1, 1), layers=len(dm.transformer_blocks),
                  heads=heads, head_dim=int(dm.inner_dim) // heads)


def _check(**facts) -> ModelFacts:
    if facts["head_dim"] not in SUPPORTED_HEAD_DIMS:
        return ModelFacts(**facts, supported=False,
                          reason=f"head dim {facts['head_dim']} has no sparse kernel (supported: {SUPPORTED_HEAD_DIMS})")
    return ModelFacts(**facts, supported=True, reason="video transformer with a 3-D token grid")


_FAMILIES = (
    ("WanModel", _wan),
    ("HunyuanVideo", _hunyuan),
    ("LTXVModel", _ltxv),
)


def describe(model) -> ModelFacts:
    """Facts about a ComfyUI MODEL (a ModelPatcher). Never raises for a model it does not know."""
    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    if dm is None:
        return _unknown(type(model).__name__, "not a diffusion model (no diffusion_model inside)")
    config_name = type(getattr(base, "model_config", None)).__name__
    names = _class_names(dm)
    for class_name, adapter in _FAMILIES:
        if class_name in names:
            try:
                return adapter(dm, config_name)
            except (AttributeError, IndexError, TypeError, ZeroDivisionError) as e:
                return _unknown(type(dm).__name__, f"looks like {class_name} but its layout is unexpected ({e})")
    return _unknown(type(dm).__name__,
                    f"{type(dm).__name__} ({config_name}) is not a video transformer USV supports; "
                    f"supported: {', '.join(SUPPORTED_FAMILIES)}")


# Token layouts: how each family's diffusion-model call lays out its tokens. -------------------

def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


class WanAdapter:
    """Wan 2.1 / 2.2: x (B, C, T, H, W) patchified by (1, 2, 2) into a raster grid; optional
    frames concatenated in time (time_dim_concat) extend the grid; reference latents (ref_conv)
    put tokens before it. Image tokens of i2v live in the cross-attention context only."""

    name = "Wan"

    @staticmethod
    def token_layout(dm, a: dict):
        x = a.get("x")
        if x is None or x.ndim != 5:
            return None
        pt, ph, pw = (int(p) for p in dm.patch_size)
        t = x.shape[2]
        extra = a.get("time_dim_concat")
        if extra is not None:
            t += extra.shape[2]
        grid = (_ceil_div(t, pt), _ceil_div(x.shape[3], ph), _ceil_div(x.shape[4], pw))
        prefix = 0
        ref = (a.get("kwargs") or {}).get("reference_latent")
        if getattr(dm, "ref_conv", None) is not None and ref is not None:
            prefix = _ceil_div(ref.shape[-2], ph) * _ceil_div(ref.shape[-1], pw) * (ref.shape[2] if ref.ndim == 5 else 1)
        return grid, prefix

    @staticmethod
    def block_keys(dm):
        return [("double_block", i) for i in range(len(dm.blocks))]


class LTXVAdapter:
    """LTX-Video: x (B, C, T, H, W) with patch size 1, tokens in raster order."""

    name = "LTX-Video"

    @staticmethod
    def token_layout(dm, a: dict):
        x = a.get("x")
        if x is None or x.ndim != 5:
            return None
        return (x.shape[2], x.shape[3], x.shape[4]), 0

    @staticmethod
    def block_keys(dm):
        return [("double_block", i) for i in range(len(dm.transformer_blocks))]


class HunyuanAdapter:
    """HunyuanVideo: x (B, C, T, H, W) patchified by its patch size (padded up) into a raster grid;
    a reference latent (ref_latent) puts tokens before it. Every double and single block runs one
    joint self-attention over the image tokens followed by the text tokens (the double blocks
    concatenate image first, the single blocks run on cat(img, txt)); the token refiner's
    text-only attention runs before any block. Image-only models of the family (2-D patch) get a
    grid of one frame."""

    name = "HunyuanVideo"
    text_suffix = True  # attention calls carry text tokens after the grid, attended densely

    @staticmethod
    def _grid(sizes, patch):
        if len(patch) == 2:  # image models: one frame
            sizes, patch = (1,) + tuple(sizes), (1,) + tuple(patch)
        return tuple(_ceil_div(n, p) for n, p in zip(sizes, patch))

    @staticmethod
    def token_layout(dm, a: dict):
        x = a.get("x")
        patch = tuple(int(p) for p in dm.patch_size)
        if x is None or len(patch) not in (2, 3) or x.ndim != 2 + len(patch):
            return None
        grid = HunyuanAdapter._grid(x.shape[2:], patch)
        ref = a.get("ref_latent")
        prefix = math.prod(HunyuanAdapter._grid(ref.shape[2:], patch)) if ref is not None else 0
        return grid, prefix

    @staticmethod
    def block_keys(dm):
        return ([("double_block", i) for i in range(len(dm.double_blocks))]
                + [("single_block", i) for i in range(len(dm.single_blocks))])


_ADAPTERS = {"Wan 2.1": WanAdapter, "Wan 2.2": WanAdapter, "HunyuanVideo": HunyuanAdapter, "LTX-Video": LTXVAdapter}


def adapter_for(model):
    """(facts, adapter) for a model USV can patch; raises ValueError naming what it supports."""
    facts = describe(model)
    adapter = _ADAPTERS.get(facts.family)
    if adapter is None or not facts.supported:
        raise ValueError(
            f"USV cannot patch this model ({facts.family}{', ' + facts.variant if facts.variant else ''}): {facts.reason}. "
            f"Supported: Wan 2.1 / 2.2 (t2v, i2v, ti2v 5B), HunyuanVideo and LTX-Video."
        )
    return facts, adapter
