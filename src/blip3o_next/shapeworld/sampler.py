"""Scene sampling: random scenes, and scenes that satisfy a prompt's requirement.

Placement is rejection sampling over box positions; every draw comes from the
numpy Generator passed in, so a seed fixes the scene.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .prompts import Requirement, random_word, text_group_index
from .render import make_text
from .world import (
    BACKGROUNDS,
    CAP_HEIGHT_RANGE,
    COLORS,
    MARGIN,
    MAX_OBJECTS,
    SHAPES,
    SIZE_RANGES,
    UNNAMED_SIZE_RANGE,
    Box,
    Scene,
    ShapeObject,
    TextObject,
    check_canvas,
    default_text_color,
    SAMPLING_SLACK,
    relation_holds,
    scale,
)

PLACEMENT_TRIES = 200
SCENE_TRIES = 100


class PlacementError(RuntimeError):
    """No arrangement satisfying the constraints was found."""


def fits(box: Box, canvas: int, occupied: list[Box]) -> bool:
    """Inside the canvas with the margin, and at least the gap away from every occupied box."""
    return _fits(box.x0, box.y0, box.x1, box.y1, canvas, occupied)


def _fits(x0: float, y0: float, x1: float, y1: float, canvas: int, occupied: list[Box]) -> bool:
    """`fits` for a box given by its edges: placement loops test many boxes and build only the one that fits."""
    m = MARGIN * scale(canvas)
    if x0 < m or y0 < m or x1 > canvas - m or y1 > canvas - m:
        return False
    # Box.gap_to, inlined: the Chebyshev gap to each occupied box.
    return all(max(o.x0 - x1, x0 - o.x1, o.y0 - y1, y0 - o.y1) >= m for o in occupied)


def draw_size(rng: np.random.Generator, canvas: int, size_name: str | None) -> float:
    lo, hi = SIZE_RANGES[size_name] if size_name else UNNAMED_SIZE_RANGE
    return float(rng.integers(lo, hi + 1)) * scale(canvas)


def place_shape(
    rng: np.random.Generator,
    canvas: int,
    shape: str,
    color: str,
    size: float,
    occupied: list[Box],
    accept: Callable[[Box], bool] = lambda box: True,
) -> ShapeObject | None:
    """A shape at a uniformly drawn free position (quarter-pixel grid) that `accept`s, or None."""
    m = MARGIN * scale(canvas)
    lo, hi = m + size / 2, canvas - m - size / 2
    if hi < lo:
        return None
    h = size / 2
    for _ in range(PLACEMENT_TRIES):
        cx, cy = (round(v * 4) / 4 for v in rng.uniform(lo, hi, size=2).tolist())  # round half to even, as np.round
        if _fits(cx - h, cy - h, cx + h, cy + h, canvas, occupied):
            obj = ShapeObject(shape, color, cx, cy, size)
            if accept(obj.box):
                return obj
    return None


def place_shape_nearest(
    canvas: int,
    shape: str,
    color: str,
    size: float,
    occupied: list[Box],
    point: tuple[float, float],
    accept: Callable[[Box], bool] = lambda box: True,
) -> ShapeObject | None:
    """The free position on the whole-pixel grid nearest to `point` that `accept`s (ties in raster order), or None.

    Deterministic, unlike `place_shape`: an edit target placed this way is a function of the source and the
    instruction, so a model trained on such pairs learns one place to put a new or moved object instead of a spread
    over every free cell (which greedy decoding never picks; docs/editing.md)."""
    m = MARGIN * scale(canvas)
    lo, hi = m + size / 2, canvas - m - size / 2
    if hi < lo:
        return None
    axis = np.arange(np.ceil(lo), np.floor(hi) + 1)
    xs, ys = (a.ravel() for a in np.meshgrid(axis, axis, indexing="xy"))
    h = size / 2
    free = np.ones(xs.shape, dtype=bool)  # `_fits` for every candidate at once: the gap to each occupied box
    for o in occupied:
        free &= np.maximum.reduce([o.x0 - (xs + h), (xs - h) - o.x1, o.y0 - (ys + h), (ys - h) - o.y1]) >= m
    xs, ys = xs[free], ys[free]
    for i in np.lexsort((xs, ys, (xs - point[0]) ** 2 + (ys - point[1]) ** 2)).tolist():
        obj = ShapeObject(shape, color, float(xs[i]), float(ys[i]), size)
        if accept(obj.box):
            return obj
    return None


def place_text(
    rng: np.random.Generator,
    canvas: int,
    word: str,
    color: str,
    occupied: list[Box],
    cap_height: float | None = None,
    accept: Callable[[Box], bool] = lambda box: True,
) -> TextObject | None:
    """A horizontally centred word at a random height, or None if it cannot fit."""
    if cap_height is None:
        cap_height = float(rng.integers(CAP_HEIGHT_RANGE[0], CAP_HEIGHT_RANGE[1] + 1)) * scale(canvas)
    m = MARGIN * scale(canvas)
    probe = make_text(word, canvas / 2, canvas / 2, cap_height, color)  # the word's measured height
    for _ in range(PLACEMENT_TRIES):
        cy = float(rng.uniform(m + probe.height / 2, canvas - m - probe.height / 2))
        text = make_text(word, canvas / 2, cy, cap_height, color)
        if fits(text.box, canvas, occupied) and accept(text.box):
            return text
    return None


def sample_scene(
    rng: np.random.Generator,
    canvas: int = 64,
    max_shapes: int = 5,
    text_probability: float = 0.3,
    colored_text_probability: float = 0.1,
) -> Scene:
    """A random scene: random background, 0-`max_shapes` shapes of any size, maybe a word."""
    check_canvas(canvas)
    for _ in range(SCENE_TRIES):
        background = str(rng.choice(list(BACKGROUNDS)))
        occupied: list[Box] = []
        text = None
        if rng.random() < text_probability:
            color = str(rng.choice(list(COLORS))) if rng.random() < colored_text_probability else default_text_color(background)
            text = place_text(rng, canvas, random_word(rng), color, occupied)
            if text is None:
                continue
            occupied.append(text.box)
        n = int(rng.integers(0 if text else 1, min(max_shapes, MAX_OBJECTS - (text is not None)) + 1))
        objects = []
        for _ in range(n):
            size = float(rng.integers(SIZE_RANGES["small"][0], SIZE_RANGES["large"][1] + 1)) * scale(canvas)
            obj = place_shape(rng, canvas, str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), size, occupied)
            if obj is None:
                break
            objects.append(obj)
            occupied.append(obj.box)
        else:
            return Scene(canvas, background, tuple(objects), text)
    raise PlacementError(f"could not place a random scene on a {canvas}px canvas")


def sample_scene_for(req: Requirement, rng: np.random.Generator, canvas: int = 64) -> Scene:
    """A scene holding exactly what `req` asks for; unspecified attributes are drawn at random."""
    check_canvas(canvas)
    req.validate()
    text_index = text_group_index(req)
    for _ in range(SCENE_TRIES):
        background = req.background or str(rng.choice(list(BACKGROUNDS)))
        occupied: list[Box] = []
        boxes_by_group: dict[int, list[Box]] = {}

        def satisfies_relations(group: int, box: Box) -> bool:
            for r in req.relations:
                others = boxes_by_group.get(r.object, [])
                if r.subject == group and not all(relation_holds(box, r.relation, o, canvas, SAMPLING_SLACK) for o in others):
                    return False
                others = boxes_by_group.get(r.subject, [])
                if r.object == group and not all(relation_holds(o, r.relation, box, canvas, SAMPLING_SLACK) for o in others):
                    return False
            return True

        text = None
        if req.word:
            color = req.word_color or default_text_color(background)
            text = place_text(rng, canvas, req.word, color, occupied, accept=lambda b: satisfies_relations(text_index, b))
            if text is None:
                continue
            occupied.append(text.box)
            boxes_by_group[text_index] = [text.box]
        objects: list[ShapeObject] = []
        ok = True
        for gi, g in enumerate(req.groups):
            for _ in range(g.count):
                shape = g.shape or str(rng.choice(SHAPES))
                color = g.color or str(rng.choice(list(COLORS)))
                size = draw_size(rng, canvas, g.size)
                obj = place_shape(rng, canvas, shape, color, size, occupied, accept=lambda b, gi=gi: satisfies_relations(gi, b))
                if obj is None:
                    ok = False
                    break
                objects.append(obj)
                occupied.append(obj.box)
                boxes_by_group.setdefault(gi, []).append(obj.box)
            if not ok:
                break
        if ok:
            return Scene(canvas, background, tuple(objects), text)
    raise PlacementError(f"could not place a scene for {req} on a {canvas}px canvas")
