"""Just enough PNG to save a frame strip and a loss plot without an imaging library."""

from __future__ import annotations

import struct
import zlib

import numpy as np


def write_png(path: str, rgb: np.ndarray) -> None:
    """rgb (H, W, 3) uint8."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = b"".join(b"\x00" + rgb[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))


_LINE_COLOURS = [(230, 60, 50), (40, 120, 230), (40, 170, 80), (200, 150, 20), (140, 60, 200)]


def plot_curves(curves: dict[str, list[float]], width: int = 640, height: int = 240 ) -> np.ndarray:
    """One panel per curve, log10 y, each a smoothed line over its own step axis; grey grid lines
    at powers of ten. Returns (H * panels, W, 3) uint8."""
    panels = []
    for i, (name, ys) in enumerate(curves.items()):
        if not len(ys):  # a phase read back without its curve
            continue
        img = np.full((height, width, 3), 255, np.uint8)
        y = np.log10(np.maximum(np.asarray(ys, dtype=np.float64), 1e-8))
        if len(y) > 20:  # moving average, so the trend shows through the noise of single batches
            k = max(1, len(y) // 50)
            y = np.convolve(y, np.ones(k) / k, mode="valid")
        lo, hi = float(np.floor(y.min())), float(np.ceil(y.max()))
        hi = max(hi, lo + 1)
        to_row = lambda v: (height - 8) - (v - lo) / (hi - lo) * (height - 16)
        for dec in range(int(lo), int(hi) + 1):
            img[int(np.clip(to_row(dec), 0, height - 1)), :] = 200
        xs = np.linspace(8, width - 8, len(y))
        rows = to_row(y)
        for x0, x1, r0, r1 in zip(xs[:-1], xs[1:], rows[:-1], rows[1:]):
            n = int(max(abs(x1 - x0), abs(r1 - r0))) + 1
            for a in np.linspace(0, 1, n):
                img[int(np.clip(r0 + a * (r1 - r0), 0, height - 1)), int(x0 + a * (x1 - x0))] = _LINE_COLOURS[i % len(_LINE_COLOURS)]
        img[:2, :] = 0
        panels.append(img)
    return np.concatenate(panels, 0) if panels else np.full((height, width, 3), 255, np.uint8)
