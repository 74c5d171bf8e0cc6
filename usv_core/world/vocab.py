"""The world's vocabulary: named colours, shapes, and how captions are written and read.

One place owns the words so that the renderer, the captioner, the score and the caption
encoder can never disagree about them."""

from __future__ import annotations

import re

# Distinct, saturated RGB in [0, 1]; far apart from each other and from the background so that
# the score can tell them apart by nearest colour even after a lossy VAE.
COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.12, 0.10),
    "green": (0.10, 0.85, 0.20),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (1.00, 0.90, 0.10),
    "white": (0.95, 0.95, 0.95),
    "purple": (0.65, 0.15, 0.90),
}
BACKGROUND: tuple[float, float, float] = (0.06, 0.06, 0.08)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)

# Words a caption may contain besides colours and shapes.
FILLER = ("a", "and")
WORDS: tuple[str, ...] = FILLER + COLOR_NAMES + SHAPES


def caption_for(objects: list[tuple[str, str]]) -> str:
    """[(colour, shape), ...] -> "a red circle, a blue square and a green triangle"."""
    parts = [f"a {c} {s}" for c, s in objects]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def words_of(text: str) -> list[str]:
    """Lower-cased words, punctuation dropped."""
    return re.findall(r"[a-z]+", text.lower())


def parse_caption(text: str) -> list[tuple[str, str]]:
    """The (colour, shape) pairs a caption names, in order: a colour word binds to the next shape
    word. Words outside the vocabulary are skipped; a shape with no colour before it is kept
    with colour None (the score then only asks for the shape)."""
    objects: list[tuple[str, str]] = []
    colour = None
    for w in words_of(text):
        if w in COLORS:
            colour = w
        elif w.rstrip("s") in SHAPES or w in SHAPES:
            shape = w if w in SHAPES else w.rstrip("s")
            objects.append((colour, shape))
            colour = None
    return objects
