"""World score: does a video show what its caption says, moving the way the world moves?

For every object the caption names (a colour and a shape) the score asks, frame by frame, whether
a compact blob of that colour is there (presence), whether its outline is that shape (shape), and
over the clip whether its centre moves at constant velocity except for reflections at the walls
(smooth) and moves at all (moving). Blobs of colours the caption does not name count as extra
objects and dilute the result. Everything is measured in normalised coordinates on a 128-pixel
square copy of the video, so any size or frame count works (non-square videos are stretched to a
square: the world is square)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .vocab import BACKGROUND, COLOR_NAMES, COLORS, SHAPES, parse_caption

WORK_SIZE = 128
COLOUR_TOL = 0.3  # RGB distance to the nearest palette colour; palette colours are >= 0.53 apart
MIN_AREA = 0.003  # fraction of the frame; the smallest world triangle covers 0.86%
MIN_COMPACT = 0.45  # area / (4 pi sqrt(det cov)): 1 for a disc, ~0.14 for scattered noise
ACC_TOL = 0.012  # normalised acceleration still counted as constant velocity
MIN_SPEED = 0.004  # normalised distance per frame; world objects move >= 0.01
WALL_MARGIN = 0.2  # a reflection must happen this close to a wall
EXTRA_FRAMES = 0.5  # an unnamed colour is an extra object if present in this share of frames

_PALETTE = torch.tensor([BACKGROUND] + [COLORS[c] for c in COLOR_NAMES], dtype=torch.float32)

# Shape prototypes in (vertical skewness, E[x^2 y^2] / (E[x^2] E[y^2])) of a solid shape centred
# on its centroid: a disc 2/3, a square 1; an upward triangle is skewed toward its base.
_PROTOTYPES = {"circle": (0.0, 2.0 / 3.0), "square": (0.0, 1.0), "triangle": (-0.57, 0.80)}
_FEATURE_SCALE = (0.25, 0.12)


def _as_video(frames) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(frames) if not isinstance(frames, torch.Tensor) else frames)
    x = x.detach().to("cpu", torch.float32)
    if x.ndim == 3:  # one image
        x = x.unsqueeze(0)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got {tuple(x.shape)}")
    x = x.clamp(0, 1).permute(0, 3, 1, 2)
    if x.shape[-2:] != (WORK_SIZE, WORK_SIZE):
        down = x.shape[-1] > WORK_SIZE or x.shape[-2] > WORK_SIZE
        x = F.interpolate(x, size=(WORK_SIZE, WORK_SIZE), mode="area" if down else "bilinear", align_corners=None if down else False)
    return x.permute(0, 2, 3, 1)  # (F, S, S, 3)


def _colour_masks(video: torch.Tensor) -> torch.Tensor:
    """(colours, F, S, S) 0/1 masks: each pixel goes to its nearest palette colour if near enough."""
    px = video.reshape(-1, 3)
    d2 = (px * px).sum(-1, keepdim=True) - 2 * px @ _PALETTE.T + (_PALETTE * _PALETTE).sum(-1)
    dist2, label = d2.min(-1)
    label = torch.where(dist2 < COLOUR_TOL ** 2, label, torch.full_like(label, -1)).view(video.shape[:3])
    return torch.stack([(label == i + 1) for i in range(len(COLOR_NAMES))]).to(torch.float64)


def _blob_stats(masks: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per (colour, frame): area, centroid, compactness and the two shape features.

    All from the raw moments E[y^b x^a] (a <= 2, b <= 3) of each mask, got in one pass as
    Y^T M X with X = [1, x, x^2] and Y = [1, y, y^2, y^3]; float64 keeps the central moments
    exact enough after the subtractions."""
    s = masks.shape[-1]
    coord = (torch.arange(s, dtype=torch.float64) + 0.5) / s
    xp = torch.stack([coord ** k for k in range(3)], -1)  # (S, 3)
    yp = torch.stack([coord ** k for k in range(4)], -1)  # (S, 4)
    raw = torch.einsum("sb,cfsw,wa->cfba", yp, masks, xp)  # (C, F, 4, 3): sum of y^b x^a
    m0 = raw[..., 0, 0]
    area = m0 / (s * s)
    e = raw / m0.clamp_min(1.0)[..., None, None]
    cx, cy = e[..., 0, 1], e[..., 1, 0]
    vxx = e[..., 0, 2] - cx ** 2
    vyy = e[..., 2, 0] - cy ** 2
    vxy = e[..., 1, 1] - cx * cy
    det = (vxx * vyy - vxy * vxy).clamp_min(1e-12)
    compact = area / (4 * np.pi * det.sqrt())
    skew = (e[..., 3, 0] - 3 * cy * e[..., 2, 0] + 2 * cy ** 3) / vyy.clamp_min(1e-12) ** 1.5
    # E[(x - cx)^2 (y - cy)^2] expanded into raw moments
    exy = lambda a, b: e[..., b, a]
    cross4 = (exy(2, 2) - 2 * cy * exy(2, 1) + cy ** 2 * exy(2, 0)
              - 2 * cx * (exy(1, 2) - 2 * cy * exy(1, 1) + cy ** 2 * exy(1, 0))
              + cx ** 2 * (exy(0, 2) - 2 * cy * exy(0, 1) + cy ** 2))
    cross = cross4 / (vxx * vyy).clamp_min(1e-12)
    present = (area >= MIN_AREA) & (compact >= MIN_COMPACT)
    f32 = lambda t: t.to(torch.float32)
    return {"area": f32(area), "cx": f32(cx), "cy": f32(cy), "compact": f32(compact), "skew": f32(skew), "cross": f32(cross), "present": present}


def _shape_of(skew: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
    """Index into SHAPES of the nearest prototype, per element."""
    d = torch.stack([((skew - ps) / _FEATURE_SCALE[0]) ** 2 + ((cross - pc) / _FEATURE_SCALE[1]) ** 2 for ps, pc in (_PROTOTYPES[n] for n in SHAPES)])
    return d.argmin(0)


def _motion(cx: np.ndarray, cy: np.ndarray, present: np.ndarray) -> tuple[float, float]:
    """(smooth, moving) of one track: the share of frame triples whose centre moves at constant
    velocity or reflects near a wall at unchanged speed, and whether it moves at all."""
    idx = np.flatnonzero(present)
    if len(idx) < 3:
        return 0.0, 0.0
    pos = np.stack([cx[idx], cy[idx]], -1)
    ok, total, speeds = 0, 0, []
    for a, b, c in zip(range(len(idx) - 2), range(1, len(idx) - 1), range(2, len(idx))):
        if idx[c] - idx[a] != 2:  # only consecutive frames say something about velocity
            continue
        total += 1
        v0, v1 = pos[b] - pos[a], pos[c] - pos[b]
        speeds.append(np.linalg.norm(v1))
        good = True
        for ax in range(2):
            if abs(v1[ax] - v0[ax]) <= ACC_TOL:
                continue
            near_wall = min(pos[b, ax], 1 - pos[b, ax]) < WALL_MARGIN
            reflected = np.sign(v0[ax]) != np.sign(v1[ax]) and abs(abs(v1[ax]) - abs(v0[ax])) <= 2 * ACC_TOL
            good = good and near_wall and reflected
        ok += good
    if total == 0:
        return 0.0, 0.0
    moving = float(np.median(speeds) >= MIN_SPEED)
    return ok / total, moving


def score_details(frames, caption: str) -> dict:
    """The score and what it is made of: one entry per named object, and the extra objects."""
    video = _as_video(frames)
    stats = _blob_stats(_colour_masks(video))
    shapes = _shape_of(stats["skew"], stats["cross"])
    present = stats["present"]
    named = parse_caption(caption)
    objects = []
    for colour, shape in named:
        rows = [COLOR_NAMES.index(colour)] if colour is not None else list(range(len(COLOR_NAMES)))
        best = None
        for r in rows:  # a shape named without a colour may be any colour: take the best match
            p = present[r].numpy()
            presence = float(p.mean())
            shape_ok = float((shapes[r][present[r]] == SHAPES.index(shape)).float().mean()) if p.any() else 0.0
            smooth, moving = _motion(stats["cx"][r].numpy(), stats["cy"][r].numpy(), p)
            value = presence * (0.4 * shape_ok + 0.3 * smooth + 0.3 * moving)
            entry = {"colour": COLOR_NAMES[r], "shape": shape, "presence": presence, "shape_ok": shape_ok, "smooth": smooth, "moving": moving, "score": value}
            if best is None or value > best["score"]:
                best = entry
        objects.append(best)
    named_colours = {o["colour"] for o in objects}
    extras = [c for i, c in enumerate(COLOR_NAMES) if c not in named_colours and float(present[i].float().mean()) >= EXTRA_FRAMES]
    denom = len(objects) + len(extras)
    total = sum(o["score"] for o in objects) / denom if denom else 0.0
    return {"score": float(min(1.0, max(0.0, total))), "objects": objects, "extras": extras}


def score(frames, caption: str) -> float:
    """World score in [0, 1] of a video (F, H, W, 3) in [0, 1] under a caption: 1 when every named
    object is there in its colour and shape, moves smoothly with reflections at the walls and
    persists through the clip, and nothing else is there."""
    return score_details(frames, caption)["score"]
