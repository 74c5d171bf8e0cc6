"""Scenes of the world: 1-3 solid shapes of distinct named colours moving at constant velocity on a
dark plain background and bouncing off the walls; sampling from a seed and rendering."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .vocab import BACKGROUND, COLOR_NAMES, COLORS, SHAPES, caption_for

SIZE = 256
FRAMES = 33
MAX_OBJECTS = 3
TRIANGLE_HEIGHT = math.sqrt(3.0)  # equilateral: height = sqrt(3) * half-width


@dataclass(frozen=True)
class WorldObject:
    colour: str
    shape: str
    half: float  # half-width in pixels of a 256-pixel frame
    x: float  # centre at frame 0, pixels
    y: float
    vx: float  # pixels per frame
    vy: float

    def extent(self) -> tuple[float, float]:
        """Half extents (x, y) of the bounding box: what bounces off the walls."""
        if self.shape == "triangle":
            return self.half, self.half * TRIANGLE_HEIGHT / 2
        return self.half, self.half


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]

    @property
    def caption(self) -> str:
        return caption_for([(o.colour, o.shape) for o in self.objects])


def sample_scene(seed: int) -> Scene:
    """Deterministic from the seed (numpy's PCG64, independent of torch's global state).
    Colours are distinct inside a clip, so that a colour names one object."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    colours = rng.choice(len(COLOR_NAMES), size=n, replace=False)
    objects = []
    for c in colours:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        half = float(rng.uniform(18, 30))
        ex, ey = (half, half * TRIANGLE_HEIGHT / 2) if shape == "triangle" else (half, half)
        x = float(rng.uniform(ex, SIZE - ex))
        y = float(rng.uniform(ey, SIZE - ey))
        speed = float(rng.uniform(2.5, 5.5))
        angle = float(rng.uniform(0, 2 * math.pi))
        objects.append(WorldObject(COLOR_NAMES[int(c)], shape, half, x, y, speed * math.cos(angle), speed * math.sin(angle)))
    return Scene(tuple(objects))


def bounce(p0: torch.Tensor, v: torch.Tensor, t: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Position at times t of a point starting at p0 with velocity v, reflected off lo and hi:
    a triangle wave of period 2 (hi - lo), so no loop over frames is needed."""
    span = (hi - lo).clamp_min(1e-6)
    u = torch.remainder(p0 - lo + v * t, 2 * span)
    return lo + torch.minimum(u, 2 * span - u)


def tracks(scene: Scene, frames: int = FRAMES) -> np.ndarray:
    """(objects, frames, 2) centre positions in pixels: the ground truth the score checks."""
    out = []
    t = torch.arange(frames, dtype=torch.float64)
    for o in scene.objects:
        ex, ey = o.extent()
        x = bounce(torch.tensor(o.x, dtype=torch.float64), torch.tensor(o.vx, dtype=torch.float64), t, torch.tensor(ex, dtype=torch.float64), torch.tensor(SIZE - ex, dtype=torch.float64))
        y = bounce(torch.tensor(o.y, dtype=torch.float64), torch.tensor(o.vy, dtype=torch.float64), t, torch.tensor(ey, dtype=torch.float64), torch.tensor(SIZE - ey, dtype=torch.float64))
        out.append(torch.stack([x, y], -1).numpy())
    return np.stack(out) if out else np.zeros((0, frames, 2))


_SHAPE_ID = {s: i for i, s in enumerate(SHAPES)}


def _pack(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Scene list -> padded float64 arrays (B, MAX_OBJECTS); padding objects have alpha 0."""
    b = len(scenes)
    fields = {k: np.zeros((b, MAX_OBJECTS)) for k in ("shape", "half", "x", "y", "vx", "vy", "alpha", "r", "g", "bl")}
    for i, s in enumerate(scenes):
        for j, o in enumerate(s.objects):
            rgb = COLORS[o.colour]
            for k, val in (("shape", _SHAPE_ID[o.shape]), ("half", o.half), ("x", o.x), ("y", o.y), ("vx", o.vx), ("vy", o.vy), ("alpha", 1.0), ("r", rgb[0]), ("g", rgb[1]), ("bl", rgb[2])):
                fields[k][i, j] = val
            fields["half"][i, j] = o.half
    return {k: torch.from_numpy(v) for k, v in fields.items()}


PATCH = 68  # pixels (on the 256 canvas) around an object's centre that can hold its coverage


def _coverage(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, hx: torch.Tensor, hy: torch.Tensor) -> torch.Tensor:
    """Anti-aliased coverage in [0, 1] from pixel offsets to the centre: one pixel of soft edge
    from a signed distance (positive outside), picking each object's own shape."""
    d_circle = torch.sqrt(dx * dx + dy * dy) - hx
    d_square = torch.maximum(dx.abs(), dy.abs()) - hx
    # Triangle pointing up, base half-width hx, height 2 hy: base edge, then the two slanted edges.
    slant = (dx.abs() * (2 * hy) - hx * (dy + hy)) / torch.sqrt((2 * hy) ** 2 + hx ** 2)
    d_tri = torch.maximum(dy - hy, slant)
    d = torch.where(shape == 0, d_circle, torch.where(shape == 1, d_square, d_tri))
    return (0.5 - d).clamp(0, 1)


@torch.no_grad()
def render(scenes: list[Scene], size: int = SIZE, frames: int = FRAMES, device: torch.device | str = "cpu") -> torch.Tensor:
    """Render a batch of scenes to (B, F, H, W, 3) float32 in [0, 1].

    Scenes are defined on a 256-pixel canvas; other sizes scale it. All frames and clips are drawn
    at once; each object only touches a square patch around its centre (a fifteenth of the frame),
    placed inside the frame so that no two patch pixels share a frame pixel."""
    p = {k: v.to(device=device, dtype=torch.float32) for k, v in _pack(scenes).items()}
    bsz = len(scenes)
    scale = size / SIZE
    patch = min(size, int(math.ceil(PATCH * scale)))
    t = torch.arange(frames, device=device, dtype=torch.float32).view(1, 1, frames)
    half = p["half"].unsqueeze(-1)  # (B, K, 1)
    is_tri = (p["shape"] == _SHAPE_ID["triangle"]).unsqueeze(-1)
    ey = torch.where(is_tri, half * TRIANGLE_HEIGHT / 2, half)
    cx = bounce(p["x"].unsqueeze(-1), p["vx"].unsqueeze(-1), t, half, SIZE - half) * scale  # (B, K, F)
    cy = bounce(p["y"].unsqueeze(-1), p["vy"].unsqueeze(-1), t, ey, SIZE - ey) * scale
    x0 = (torch.round(cx) - patch // 2).clamp(0, size - patch).long()
    y0 = (torch.round(cy) - patch // 2).clamp(0, size - patch).long()
    offs = torch.arange(patch, device=device)
    px = x0.unsqueeze(-1) + offs  # (B, K, F, P) pixel columns of the patch
    py = y0.unsqueeze(-1) + offs
    dx = (px.float() + 0.5 - cx.unsqueeze(-1)).unsqueeze(-2)  # (B, K, F, 1, P)
    dy = (py.float() + 0.5 - cy.unsqueeze(-1)).unsqueeze(-1)  # (B, K, F, P, 1)
    col = lambda v: v.view(bsz, -1, 1, 1, 1)
    cover = _coverage(col(p["shape"]), dx, dy, col(half.squeeze(-1) * scale), col(ey.squeeze(-1) * scale)) * col(p["alpha"])
    flat = (py.unsqueeze(-1) * size + px.unsqueeze(-2)).view(bsz, MAX_OBJECTS, frames, -1)  # (B, K, F, P*P)

    out = torch.tensor(BACKGROUND, device=device, dtype=torch.float32).repeat(bsz, frames, size * size, 1)
    for k in range(MAX_OBJECTS):  # later objects are drawn over earlier ones
        idx = flat[:, k].unsqueeze(-1).expand(-1, -1, -1, 3)
        a = cover[:, k].reshape(bsz, frames, -1, 1)
        rgb = torch.stack([p["r"][:, k], p["g"][:, k], p["bl"][:, k]], -1).view(bsz, 1, 1, 3)
        region = out.gather(2, idx)
        out.scatter_(2, idx, region * (1 - a) + rgb * a)
    return out.view(bsz, frames, size, size, 3)


def make_clip(seed: int, size: int = SIZE, frames: int = FRAMES) -> tuple[torch.Tensor, str]:
    """One clip: frames (F, H, W, 3) float32 in [0, 1] (ComfyUI's IMAGE layout) and its caption."""
    scene = sample_scene(seed)
    return render([scene], size=size, frames=frames)[0], scene.caption


def make_batch(seeds, size: int = SIZE, frames: int = FRAMES, device: torch.device | str = "cpu") -> tuple[torch.Tensor, list[str]]:
    """Many clips at once, on any device: (B, F, H, W, 3) and their captions."""
    scenes = [sample_scene(int(s)) for s in seeds]
    return render(scenes, size=size, frames=frames, device=device), [s.caption for s in scenes]
