"""One place per model family: how to recognise it inside a ComfyUI MODEL, and the facts USV needs
(patch size, layers, heads, head dim). Detection goes by class names, never by importing a model
module, so that ComfyUI versions that lack a family still load the pack."""

from __future__ import annotations

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
    variant = {"HunyuanVideo": "t2v", "HunyuanVideoI2V": "i2v", "HunyuanVideoSkyreelsI2V": "skyreels i2v"}.get(config_name)
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
