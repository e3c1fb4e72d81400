"""Anti-aliased renderer for ShapeWorld scenes.

Shapes are rasterised by exact point-in-shape tests on a 4 x 4 sub-pixel grid per
pixel (written by hand: Pillow rounds polygon vertices to whole pixels and draws
edges inclusively, which biases small shapes by up to a quarter pixel even at 4x).
Text uses Pillow's bundled default font, drawn at 4x and box-downsampled.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .world import BACKGROUNDS, COLORS, STAR_INNER_RATIO, TEXT_INK, Scene, ShapeObject, TextObject

SUPERSAMPLE = 4


def rgb_of(color: str) -> tuple[int, int, int]:
    if color in COLORS:
        return COLORS[color]
    if color in TEXT_INK:
        return TEXT_INK[color]
    return BACKGROUNDS[color]


@lru_cache(maxsize=None)
def _star_vertices() -> np.ndarray:
    """The 10 star vertices for a unit outer radius, point up, counter-clockwise in image coords."""
    angles = -math.pi / 2 + np.arange(10) * math.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, 1.0, STAR_INNER_RATIO)
    return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1).astype(np.float32)


def _star_edges(h: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per sector k: the edge from vertex k to k + 1 as (start x, start y, delta x, delta y), float32."""
    v = _star_vertices() * h
    d = np.concatenate([v[1:], v[:1]]) - v
    return v[:, 0], v[:, 1], d[:, 0], d[:, 1]


def _inside_star(dx: np.ndarray, dy: np.ndarray, h: float) -> np.ndarray:
    """The star is the union of the 5 triangles (center, inner vertex, outer vertex, inner vertex);
    a point is inside iff it is on the inner side of the edge of the sector it falls in.

    Computed in place, with the angle wrapped by adding 0 or 2 pi and the sector's edge looked up in 1-d
    tables: the same float32 values as `np.mod` and gathering vertex pairs, several times faster.
    """
    px, py, ex, ey = _star_edges(h)
    ang = np.arctan2(dy, dx)
    ang += np.float32(math.pi / 2)  # in [-pi/2, 3pi/2]
    ang += (ang < 0) * np.float32(2 * math.pi)
    ang /= np.float32(math.pi / 5)
    k = np.minimum(ang.astype(np.intp), 9)
    term_y = np.take(ex, k)  # cross product of the edge with (point - edge start): ex (dy - py) - ey (dx - px)
    term_y *= dy - np.take(py, k)
    term_x = np.take(ey, k)
    term_x *= dx - np.take(px, k)
    return term_y - term_x >= 0


def inside_shape(shape: str, dx: np.ndarray, dy: np.ndarray, size: float) -> np.ndarray:
    """Whether points (dx, dy), relative to the box center, lie inside `shape` of box side `size`."""
    h = size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= h * h
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= h
    if shape == "triangle":  # apex at (0, -h), base along y = +h
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    if shape == "cross":
        arm = size / 6
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= arm) & (ay <= h)) | ((ay <= arm) & (ax <= h))
    if shape == "star":
        return _inside_star(dx, dy, h)
    raise ValueError(f"unknown shape {shape!r}")


def shape_coverage(
    shape: str, cx: float, cy: float, size: float, x0: int, y0: int, w: int, h: int, supersample: int = SUPERSAMPLE
) -> np.ndarray:
    """Fractional coverage (h, w) of a shape over the pixel window starting at (x0, y0)."""
    counts = _inside_counts(shape, cx, cy, size, x0, y0, w, h, supersample)
    return counts.astype(np.float32) / np.float32(supersample * supersample)


def _inside_counts(
    shape: str, cx: float, cy: float, size: float, x0: int, y0: int, w: int, h: int, supersample: int
) -> np.ndarray:
    """Per pixel of the window, how many of its supersample x supersample sub-pixel points lie inside the shape."""
    offsets = (np.arange(supersample, dtype=np.float32) + 0.5) / supersample
    xs = (x0 + np.arange(w, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1) - cx
    ys = (y0 + np.arange(h, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1) - cy
    inside = inside_shape(shape, xs[None, :], ys[:, None], size)  # (h*k, w*k)
    return block_sums(inside.view(np.uint8).astype(np.min_scalar_type(supersample * supersample), copy=False), supersample)


def block_sums(a: np.ndarray, k: int) -> np.ndarray:
    """Sums over the k x k blocks of the last two axes, in a's dtype (which must hold them).

    Strided adds: numpy's reductions over size-k axes are several times slower."""
    rows = a[..., 0::k, :]
    for i in range(1, k):
        rows = rows + a[..., i::k, :]
    out = rows[..., 0::k]
    for j in range(1, k):
        out = out + rows[..., j::k]
    return out


def _on_exact_grid(*values: float) -> bool:
    """Multiples of 1/64 below 4096: sample offsets from such centers are exact in float32, so a shape's
    coverage depends on its center only through the sub-pixel phase (the sampler's centers and sizes are)."""
    return all(float(v * 64).is_integer() and abs(v) < 4096 for v in values)


@lru_cache(maxsize=1024)
def _phase_counts(shape: str, fx: float, fy: float, size: float) -> np.ndarray:
    """Sub-pixel counts over the whole box window of a shape centred at (fx, fy) in [0, 1)^2 (read-only)."""
    x0, y0 = math.floor(fx - size / 2), math.floor(fy - size / 2)
    w, h = math.ceil(fx + size / 2) - x0, math.ceil(fy + size / 2) - y0
    counts = _inside_counts(shape, fx, fy, size, x0, y0, w, h, SUPERSAMPLE)
    counts.setflags(write=False)
    return counts


def shape_alpha(obj: ShapeObject, canvas: int) -> tuple[int, int, np.ndarray]:
    """(x0, y0, alpha window) of a shape, clipped to the canvas.

    Shapes on the exact grid reuse the counts of their (shape, size, sub-pixel phase): same pixels, no recompute."""
    b = obj.box
    bx0, by0 = int(math.floor(b.x0)), int(math.floor(b.y0))
    x0, y0 = max(bx0, 0), max(by0, 0)
    x1, y1 = min(int(math.ceil(b.x1)), canvas), min(int(math.ceil(b.y1)), canvas)
    if x1 <= x0 or y1 <= y0:
        return x0, y0, np.zeros((0, 0), np.float32)
    if not _on_exact_grid(obj.cx, obj.cy, obj.size):
        return x0, y0, shape_coverage(obj.shape, obj.cx, obj.cy, obj.size, x0, y0, x1 - x0, y1 - y0)
    ix, iy = math.floor(obj.cx), math.floor(obj.cy)
    counts = _phase_counts(obj.shape, obj.cx - ix, obj.cy - iy, obj.size)[y0 - by0 : y1 - by0, x0 - bx0 : x1 - bx0]
    return x0, y0, counts.astype(np.float32) / np.float32(SUPERSAMPLE * SUPERSAMPLE)


@lru_cache(maxsize=64)
def font_for_cap_height(cap_px_4x: int) -> ImageFont.FreeTypeFont:
    """Pillow's default font at the point size whose capital height is closest to `cap_px_4x` pixels."""
    best, best_err = None, None
    approx = int(round(cap_px_4x / 0.7))
    for size in range(max(4, approx - 4), approx + 5):
        font = ImageFont.load_default(size=size)
        font.layout_engine = ImageFont.Layout.BASIC  # same glyph placement with or without libraqm
        top, bottom = font.getbbox("H")[1], font.getbbox("H")[3]
        err = abs((bottom - top) - cap_px_4x)
        if best_err is None or err < best_err:
            best, best_err = font, err
    return best


def _draw_in_word_box(word: str, cap_px_4x: int, text: str, x: float = 0.0) -> np.ndarray:
    """`text` drawn at 4x, `x` px right of where `word` starts, on the canvas that holds `word` with a margin."""
    font = font_for_cap_height(cap_px_4x)
    left, top, right, bottom = font.getbbox(word)
    pad = 4
    im = Image.new("L", (right - left + 2 * pad, bottom - top + 2 * pad), 0)
    ImageDraw.Draw(im).text((pad - left + x, pad - top), text, fill=255, font=font)
    return np.asarray(im)


@lru_cache(maxsize=4096)
def word_mask_4x(word: str, cap_px_4x: int) -> np.ndarray:
    """The word's ink coverage at 4x resolution, cropped to its ink box (uint8, 0..255)."""
    a = _draw_in_word_box(word, cap_px_4x, word)
    rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
    mask = a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    mask.setflags(write=False)
    return mask


@lru_cache(maxsize=4096)
def glyph_spans_4x(word: str, cap_px_4x: int) -> tuple[tuple[int, int], ...]:
    """Each letter's ink columns [x0, x1) at 4x, in `word_mask_4x`'s coordinates (letters laid out by their
    advance widths, as the word is drawn)."""
    font = font_for_cap_height(cap_px_4x)
    first = int(np.nonzero(_draw_in_word_box(word, cap_px_4x, word).any(axis=0))[0][0])
    spans = []
    for i, letter in enumerate(word):
        cols = np.nonzero(_draw_in_word_box(word, cap_px_4x, letter, font.getlength(word[:i])).any(axis=0))[0]
        spans.append((int(cols[0]) - first, int(cols[-1]) + 1 - first))
    return tuple(spans)


def glyph_boxes(text: TextObject) -> list[tuple[float, float, float, float]]:
    """(cx, cy, half width, half height) in canvas px of each letter of a text object, as it is rendered."""
    left = text.cx - text.width / 2
    return [(left + (x0 + x1) / (2 * SUPERSAMPLE), text.cy, (x1 - x0) / (2 * SUPERSAMPLE), text.height / 2)
            for x0, x1 in glyph_spans_4x(text.word, cap_height_4x(text.cap_height))]


def cap_height_4x(cap_height: float) -> int:
    return max(4, int(round(cap_height * SUPERSAMPLE)))


def make_text(word: str, cx: float, cy: float, cap_height: float, color: str) -> TextObject:
    """A text object whose ink box is snapped to the 4x grid around (cx, cy), with measured size."""
    mask = word_mask_4x(word, cap_height_4x(cap_height))
    h4, w4 = mask.shape
    left4, top4 = round(cx * SUPERSAMPLE - w4 / 2), round(cy * SUPERSAMPLE - h4 / 2)
    return TextObject(
        word=word,
        color=color,
        cx=(left4 + w4 / 2) / SUPERSAMPLE,
        cy=(top4 + h4 / 2) / SUPERSAMPLE,
        cap_height=cap_height_4x(cap_height) / SUPERSAMPLE,
        width=w4 / SUPERSAMPLE,
        height=h4 / SUPERSAMPLE,
    )


def text_alpha(text: TextObject, canvas: int) -> tuple[int, int, np.ndarray]:
    """(x0, y0, alpha window) of a text object, clipped to the canvas."""
    mask = word_mask_4x(text.word, cap_height_4x(text.cap_height))
    h4, w4 = mask.shape
    left4, top4 = round((text.cx - text.width / 2) * SUPERSAMPLE), round((text.cy - text.height / 2) * SUPERSAMPLE)
    x0, y0 = left4 // SUPERSAMPLE, top4 // SUPERSAMPLE
    x1, y1 = -(-(left4 + w4) // SUPERSAMPLE), -(-(top4 + h4) // SUPERSAMPLE)
    big = np.zeros(((y1 - y0) * SUPERSAMPLE, (x1 - x0) * SUPERSAMPLE), np.uint16)
    big[top4 - y0 * SUPERSAMPLE : top4 - y0 * SUPERSAMPLE + h4, left4 - x0 * SUPERSAMPLE : left4 - x0 * SUPERSAMPLE + w4] = mask
    alpha = block_sums(big, SUPERSAMPLE).astype(np.float32) / np.float32(SUPERSAMPLE * SUPERSAMPLE) / 255.0
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x1, canvas), min(y1, canvas)
    return cx0, cy0, alpha[cy0 - y0 : cy1 - y0, cx0 - x0 : cx1 - x0]


def _composite(img: np.ndarray, x0: int, y0: int, alpha: np.ndarray, rgb: tuple[int, int, int]) -> None:
    h, w = alpha.shape
    region = img[y0 : y0 + h, x0 : x0 + w]
    a = alpha[..., None]
    region *= 1.0 - a
    region += a * np.asarray(rgb, np.float32)


def render(scene: Scene) -> np.ndarray:
    """Render a scene to an (S, S, 3) uint8 RGB array."""
    S = scene.canvas
    img = np.empty((S, S * 3), np.float32)
    img[:] = np.tile(np.asarray(BACKGROUNDS[scene.background], np.float32), S)  # whole rows: a 3-vector fill is slow
    img = img.reshape(S, S, 3)
    for obj in scene.objects:
        _composite(img, *shape_alpha(obj, S), rgb_of(obj.color))
    if scene.text is not None:
        _composite(img, *text_alpha(scene.text, S), rgb_of(scene.text.color))
    return np.rint(img).astype(np.uint8)


def render_pil(scene: Scene) -> Image.Image:
    return Image.fromarray(render(scene), "RGB")
