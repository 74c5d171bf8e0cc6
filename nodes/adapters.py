"""One place per model family: how to recognise it inside a ComfyUI MODEL, and the facts USV needs
(patch size, layers, heads, head dim). Detection goes by class names, never by importing a model
module, so that ComfyUI versions that lack a family still load the pack."""

from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_HEAD_DIMS = (64, 128)
SUPPORTED_FAMILIES = ("Wan 2.1", "Wan 2.2", "HunyuanVideo", "LTX-Video", "LTX-2")


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


# ComfyUI model configs of the Wan family: (family, variant, served). Served variants lay their
# tokens out as a grid, optionally with reference tokens before it or extra tokens after it.
_WAN_VARIANTS = {
    "WAN21_T2V": ("Wan 2.1", "t2v", True),
    "WAN21_I2V": ("Wan 2.1", "i2v", True),
    "WAN22_T2V": ("Wan 2.2", "ti2v 5B", True),
    "WAN21_FlowRVS": ("Wan 2.1", "flowrvs", True),
    "WAN22_WanDancer": ("Wan 2.2", "wandancer", True),
    "WAN21_SCAIL": ("Wan 2.1", "scail", True),
    "WAN21_SCAIL2": ("Wan 2.1", "scail2", True),
    "WAN21_FunControl2V": ("Wan 2.1", "fun control", False),
    "WAN21_Camera": ("Wan 2.1", "camera", False),
    "WAN21_Vace": ("Wan 2.1", "vace", False),
    "WAN21_HuMo": ("Wan 2.1", "humo", False),
    "WAN21_CausalAR_T2V": ("Wan 2.1", "causal AR", False),
    "WAN22_Camera": ("Wan 2.2", "camera", False),
    "WAN22_S2V": ("Wan 2.2", "s2v", False),
    "WAN22_Animate": ("Wan 2.2", "animate", False),
}
SERVED_WAN = ", ".join(v for _f, v, ok in _WAN_VARIANTS.values() if ok)
_WAN_WHY_NOT = {
    "causal AR": "its causal self-attention reads keys from a cache of earlier chunks",
}


def _wan(dm, config_name: str) -> ModelFacts:
    heads = int(dm.num_heads)
    facts = dict(patch_size=tuple(int(p) for p in dm.patch_size), layers=len(dm.blocks), heads=heads,
                 head_dim=int(dm.dim) // heads)
    known = _WAN_VARIANTS.get(config_name)
    if known is None:
        # A release newer than this pack: the plain model class keeps the plain layout, and the
        # layout checks at run time catch a call whose tokens are not the grid's.
        plain = type(dm).__name__ == "WanModel"
        variant = f"{config_name}, {type(dm).__name__}"
        if plain:
            return _check(family="Wan 2.1", variant=variant, **facts)
        return ModelFacts(family="Wan 2.1", variant=variant, **facts, supported=False,
                          reason=f"{type(dm).__name__} is a Wan variant USV has no adapter for yet; served: {SERVED_WAN}")
    family, variant, served = known
    if served:
        return _check(family=family, variant=variant, **facts)
    why = _WAN_WHY_NOT.get(variant, "it adds tokens or streams USV has no adapter for yet")
    return ModelFacts(family=family, variant=variant, **facts, supported=False,
                      reason=f"the {variant} variant is not served: {why}; served: {SERVED_WAN}")


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
    audio = "LTXAVModel" in _class_names(dm)
    return _check(family="LTX-2" if audio else "LTX-Video", variant="audio-video" if audio else None, patch_size=(1, 1, 1),
                  layers=len(dm.transformer_blocks), heads=heads, head_dim=int(dm.inner_dim) // heads)


def _kandinsky5(dm, config_name: str) -> ModelFacts:
    return _unknown("Kandinsky 5", "Kandinsky 5 video is not supported yet: USV has no adapter for its "
                                   "token layout; supported: " + ", ".join(SUPPORTED_FAMILIES))


def _check(**facts) -> ModelFacts:
    if facts["head_dim"] not in SUPPORTED_HEAD_DIMS:
        return ModelFacts(**facts, supported=False,
                          reason=f"head dim {facts['head_dim']} has no sparse kernel (supported: {SUPPORTED_HEAD_DIMS})")
    return ModelFacts(**facts, supported=True, reason="video transformer with a 3-D token grid")


_FAMILIES = (
    ("WanModel", _wan),
    ("HunyuanVideo", _hunyuan),
    ("LTXVModel", _ltxv),
    ("Kandinsky5", _kandinsky5),
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

@dataclass(frozen=True)
class TokenLayout:
    """A call's tokens: `prefix` tokens, then the grid in raster order, then `suffix` tokens.
    Sparse attention serves the grid; the tokens around it attend and are attended densely."""

    grid: tuple[int, int, int]
    prefix: int = 0
    suffix: int = 0


def _ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _patched_tokens(shape, patch) -> int:
    """Tokens of a (B, C, T, H, W) latent after a (pt, ph, pw) patch embedding."""
    return math.prod(_ceil_div(n, p) for n, p in zip(shape[2:], patch))


class WanAdapter:
    """Wan 2.1 / 2.2: x (B, C, T, H, W) patchified by (1, 2, 2) into a raster grid. Frames
    concatenated in time (time_dim_concat, SCAIL's reference frames) extend the grid; reference
    latents (ref_conv) put tokens before it; in-context latents (context_latents) and SCAIL's pose
    latents put tokens after it. Image tokens of i2v live in the cross-attention context only."""

    name = "Wan"

    @staticmethod
    def token_layout(dm, a: dict):
        x = a.get("x")
        if not hasattr(x, "ndim") or x.ndim != 5:
            return "the latent is not one (batch, channels, frames, height, width) tensor"
        patch = tuple(int(p) for p in dm.patch_size)
        kwargs = a.get("kwargs") or {}
        t = x.shape[2]
        extra = a.get("time_dim_concat")
        if extra is not None:
            t += extra.shape[2]
        ref = kwargs.get("reference_latent")
        prefix = suffix = 0
        if "SCAILWanModel" in _class_names(dm):
            if ref is not None:  # concatenated in time before the patch embedding
                t += ref.shape[2]
            pose = a.get("pose_latents")  # a parameter of SCAIL's forward, not a kwarg
            if pose is not None:
                suffix += _patched_tokens(pose.shape, patch)
        elif getattr(dm, "ref_conv", None) is not None and ref is not None:
            prefix = _ceil_div(ref.shape[-2], patch[1]) * _ceil_div(ref.shape[-1], patch[2]) * (ref.shape[2] if ref.ndim == 5 else 1)
        for lat in kwargs.get("context_latents") or ():
            suffix += _patched_tokens(lat.shape, patch)
        grid = (_ceil_div(t, patch[0]), _ceil_div(x.shape[3], patch[1]), _ceil_div(x.shape[4], patch[2]))
        return TokenLayout(grid, prefix, suffix)

    @staticmethod
    def block_keys(dm):
        return [("double_block", i) for i in range(len(dm.blocks))]


class LTXVAdapter:
    """LTX-Video: x (B, C, T, H, W) with patch size 1, tokens in raster order. Keyframe guides
    (LTXVAddGuide) append their frames to the latent; where a negative denoise mask drops guide
    tokens (ComfyUI 0.22+), the model keeps only its grid mask's tokens: the video frames then
    stay the grid and the guide tokens that survive follow it."""

    name = "LTX-Video"

    @staticmethod
    def _video(a: dict):
        return a.get("x")

    @classmethod
    def token_layout(cls, dm, a: dict):
        x = cls._video(a)
        if not hasattr(x, "ndim") or x.ndim != 5:
            return "the video latent is not one (batch, channels, frames, height, width) tensor"
        t, h, w = x.shape[2:]
        keyframes = a.get("keyframe_idxs")
        mask = a.get("denoise_mask")
        if isinstance(mask, (list, tuple)):
            mask = mask[0] if mask else None
        if keyframes is None or keyframes.shape[2] == 0 or mask is None:
            return TokenLayout((t, h, w))
        if mask.ndim != 5 or tuple(mask.shape[2:]) != (t, h, w):
            return f"a denoise mask of shape {tuple(mask.shape)} does not match the latent's grid {(t, h, w)}"
        kept = ~(mask[0] < 0).any(dim=0).flatten()  # the model's grid mask (batch 0, as the model reads it)
        if bool(kept.all()):
            return TokenLayout((t, h, w))
        guide = int(keyframes.shape[2])  # guide tokens, at the end before dropping
        video = kept.numel() - guide
        if video < 0 or video % (h * w) or not bool(kept[:video].all()):
            return "keyframe guides drop tokens inside the video frames"
        return TokenLayout((video // (h * w), h, w), 0, int(kept[video:].sum()))

    @staticmethod
    def block_keys(dm):
        return [("double_block", i) for i in range(len(dm.transformer_blocks))]


class LTXAVAdapter(LTXVAdapter):
    """LTX-2: the diffusion model gets [video, audio] latents; each block runs video self-attention
    first (served), then video cross-attention, audio self- and cross-attention and the
    audio-video attention (all handed on)."""

    name = "LTX-2"

    @staticmethod
    def _video(a: dict):
        x = a.get("x")
        return x[0] if isinstance(x, (list, tuple)) and x else x


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
        if not hasattr(x, "ndim") or len(patch) not in (2, 3) or x.ndim != 2 + len(patch):
            return f"the latent is not a {len(patch)}-D grid of tokens"
        grid = HunyuanAdapter._grid(x.shape[2:], patch)
        ref = a.get("ref_latent")
        prefix = math.prod(HunyuanAdapter._grid(ref.shape[2:], patch)) if ref is not None else 0
        return TokenLayout(grid, prefix)

    @staticmethod
    def block_keys(dm):
        return ([("double_block", i) for i in range(len(dm.double_blocks))]
                + [("single_block", i) for i in range(len(dm.single_blocks))])


_ADAPTERS = {"Wan 2.1": WanAdapter, "Wan 2.2": WanAdapter, "HunyuanVideo": HunyuanAdapter, "LTX-Video": LTXVAdapter,
             "LTX-2": LTXAVAdapter}


def adapter_for(model):
    """(facts, adapter) for a model USV can patch; raises ValueError naming what it supports."""
    facts = describe(model)
    adapter = _ADAPTERS.get(facts.family)
    if adapter is None or not facts.supported:
        raise ValueError(
            f"USV cannot patch this model ({facts.family}{', ' + facts.variant if facts.variant else ''}): {facts.reason}. "
            f"Supported: Wan 2.1 / 2.2 ({SERVED_WAN}), HunyuanVideo, LTX-Video and LTX-2."
        )
    return facts, adapter
