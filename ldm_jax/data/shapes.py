"""Procedural images of one or two coloured shapes on a coloured background, with captions.

Everything is a pure function of ``(seed, split, index)``: ``make_example`` draws the scene with
PIL (no anti-aliasing, so every pixel is exactly a palette colour) and writes a caption from varied
templates. Scenes sit on a 3x3 grid (one shape per cell, never overlapping). Some (shape, colour)
pairs are held out of train/validation (``HELDOUT_PAIRS``) and appear only in the ``heldout``
split, to test compositional generalisation.
"""
from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "SHAPES", "COLORS", "COLOR_RGB", "SIZES", "SIZE_FRACTIONS", "POSITIONS", "SPLITS", "HELDOUT_PAIRS",
    "make_example", "render", "caption_for", "MAX_SHAPE_SCALE",
]

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")
COLOR_RGB = np.array([
    [220, 30, 30], [30, 170, 50], [30, 60, 220], [240, 220, 30],
    [140, 40, 170], [250, 140, 20], [245, 245, 245], [15, 15, 15],
], np.uint8)
SIZES = ("small", "large")
# Shape "radius" (centre to farthest point) as a fraction of the grid cell side.
SIZE_FRACTIONS = (0.22, 0.38)
_JITTER_FRAC = 0.06  # max centre offset inside the cell, fraction of the cell side
# Largest radius multiplier: 0.38 * 1.15 + 0.06 < 0.5, a large shape stays inside its cell.
MAX_SHAPE_SCALE = 1.15
POSITIONS = ("top left", "top", "top right", "left", "center", "right",
             "bottom left", "bottom", "bottom right")
SPLITS = ("train", "validation", "heldout")
# One colour per shape never seen in train/validation: (shape, colour) index pairs.
HELDOUT_PAIRS = frozenset((s, (2 * s + 1) % len(COLORS)) for s in range(len(SHAPES)))

_SHAPE_WORDS = {
    "circle": ("circle", "round shape", "disc"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "triangular shape"),
    "star": ("star", "five-pointed star"),
    "diamond": ("diamond", "rhombus"),
}
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_ROW_WORDS = (("top", "upper"), None, ("bottom", "lower"))
_COL_WORDS = ("left", None, "right")


def _position_phrase(pos: int, rng: np.random.Generator) -> str:
    row, col = divmod(pos, 3)
    rw, cw = _ROW_WORDS[row], _COL_WORDS[col]
    if rw is None and cw is None:
        options = ("in the center", "in the middle", "at the centre")
    elif rw is None:
        options = (f"on the {cw}", f"at the {cw} side", f"on the {cw} edge")
    elif cw is None:
        r = rw[int(rng.integers(len(rw)))]
        options = (f"at the {r}", f"at the {r} center", f"along the {r} edge")
    else:
        r = rw[int(rng.integers(len(rw)))]
        options = (f"in the {r} {cw}", f"at {r}-{cw}", f"in the {r} {cw} corner")
    return options[int(rng.integers(len(options)))]


def _pick(options, rng):
    return options[int(rng.integers(len(options)))]


def caption_for(shapes, colors, sizes, positions, background: int, rng: np.random.Generator) -> str:
    """Caption for a scene (lists of shape/colour/size/position indices) from random templates."""
    bg = COLORS[background]
    descs = []
    for s, c, z, p in zip(shapes, colors, sizes, positions):
        shape = _pick(_SHAPE_WORDS[SHAPES[s]], rng)
        size = _pick(_SIZE_WORDS[SIZES[z]], rng)
        where = _position_phrase(p, rng)
        style = int(rng.integers(3 if len(shapes) == 1 else 2)) * (1 if len(shapes) == 1 else 2)
        if style == 0:
            descs.append(f"a {size} {COLORS[c]} {shape} {where}")
        elif style == 1:
            descs.append(f"a {COLORS[c]} {shape} {where}, {size}")
        else:
            descs.append(f"a {size} {shape} in {COLORS[c]} {where}")
    objs = descs[0] if len(descs) == 1 else f"{descs[0]} and {descs[1]}"
    template = int(rng.integers(5))
    if template == 0:
        return f"{objs} on a {bg} background"
    if template == 1:
        return f"{bg} background, {objs}"
    if template == 2:
        return f"a picture of {objs}, {bg} background"
    if template == 3:
        return f"{objs} against a plain {bg} backdrop"
    return f"an image with a {bg} background and {objs}"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # equilateral, pointing up, circumcentre at (cx, cy)
        return [(cx + r * math.cos(a), cy - r * math.sin(a))
                for a in (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        pts = []
        for k in range(10):
            a = math.pi / 2 + k * math.pi / 5
            rk = r if k % 2 == 0 else 0.45 * r
            pts.append((cx + rk * math.cos(a), cy - rk * math.sin(a)))
        return pts
    raise ValueError(f"no polygon for shape {shape!r}")


def render(image_size: int, shapes, colors, centers, radii, background: int) -> np.ndarray:
    """Draw the scene: uint8 [image_size, image_size, 3]. ``centers`` are (x, y) pixels."""
    img = Image.new("RGB", (image_size, image_size), tuple(int(v) for v in COLOR_RGB[background]))
    draw = ImageDraw.Draw(img)
    for s, c, (cx, cy), r in zip(shapes, colors, centers, radii):
        fill = tuple(int(v) for v in COLOR_RGB[c])
        name = SHAPES[s]
        if name == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif name == "square":
            h = r / math.sqrt(2)  # r is the half-diagonal, so all shapes fit the same circle
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon(_polygon(name, cx, cy, r), fill=fill)
    return np.asarray(img)


def make_example(seed: int, split: str, index: int, image_size: int = 64, max_shapes: int = 2,
                 shape_scale: float = 1.0) -> dict:
    """One scene, a pure function of its arguments.

    ``shape_scale`` multiplies the shape radii (small 0.22, large 0.38 of a grid cell); at most
    :data:`MAX_SHAPE_SCALE`, so a large shape still fits its cell with the centre jitter.

    Returns ``image`` uint8 [S,S,3], ``caption`` str and labels, each length-2 (slot 1 is -1 / 0
    when the scene has one shape): ``shape``, ``color``, ``size``, ``position`` (index into
    ``POSITIONS``, row-major 3x3 grid) int32; ``center`` float32 [2, 2] (x, y) pixels; ``radius``
    float32 [2] pixels; and ``background``, ``num_shapes`` ints.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 16 <= image_size <= 1024:
        raise ValueError(f"image_size must be in [16, 1024], got {image_size}")
    if max_shapes not in (1, 2):
        raise ValueError(f"max_shapes must be 1 or 2, got {max_shapes}")
    if not 0.0 < shape_scale <= MAX_SHAPE_SCALE:
        raise ValueError(f"shape_scale must be in (0, {MAX_SHAPE_SCALE}], got {shape_scale}")
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    n = int(rng.integers(1, max_shapes + 1))
    positions = rng.choice(len(POSITIONS), size=n, replace=False)
    shapes, colors, sizes = [], [], []
    for k in range(n):
        while True:
            s, c = int(rng.integers(len(SHAPES))), int(rng.integers(len(COLORS)))
            held = (s, c) in HELDOUT_PAIRS
            # heldout split: the first shape is a held-out pair; all other shapes never are.
            if held == (split == "heldout" and k == 0):
                break
        shapes.append(s)
        colors.append(c)
        sizes.append(int(rng.integers(len(SIZES))))
    background = int(rng.choice([c for c in range(len(COLORS)) if c not in colors]))
    cell = image_size / 3.0
    centers, radii = [], []
    for p, z in zip(positions, sizes):
        row, col = divmod(int(p), 3)
        jx, jy = rng.uniform(-_JITTER_FRAC, _JITTER_FRAC, size=2) * cell
        centers.append(((col + 0.5) * cell + jx, (row + 0.5) * cell + jy))
        radii.append(SIZE_FRACTIONS[z] * shape_scale * cell)
    image = render(image_size, shapes, colors, centers, radii, background)
    caption = caption_for(shapes, colors, sizes, [int(p) for p in positions], background, rng)

    def pad(values, fill, dtype):
        out = np.full((2,) + np.shape(values[0]), fill, dtype)
        out[:n] = values
        return out

    return {
        "image": image,
        "caption": caption,
        "num_shapes": n,
        "background": background,
        "shape": pad(shapes, -1, np.int32),
        "color": pad(colors, -1, np.int32),
        "size": pad(sizes, -1, np.int32),
        "position": pad([int(p) for p in positions], -1, np.int32),
        "center": pad(centers, 0.0, np.float32),
        "radius": pad(radii, 0.0, np.float32),
    }
