"""The renderer follows the ShapeWorld contract: palette, geometry, anti-aliasing, placement, determinism."""

import numpy as np
import pytest

from blip3o_next.shapeworld.render import render, shape_alpha, word_mask_4x, cap_height_4x
from blip3o_next.shapeworld.sampler import sample_scene
from blip3o_next.shapeworld.world import (
    BACKGROUNDS, CAP_HEIGHT_RANGE, COLORS, MARGIN, SHAPES, Scene, ShapeObject, check_canvas, scale,
)
from blip3o_next.shapeworld.render import make_text

AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "cross": 5 / 9, "star": 10 * 0.5 * 0.5 * 0.225 * np.sin(np.pi / 5)}


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_area_matches_geometry(shape):
    obj = ShapeObject(shape, "red", 32.3, 31.7, 20.0)
    _, _, alpha = shape_alpha(obj, 64)
    assert alpha.sum() / 400.0 == pytest.approx(AREA[shape], abs=0.01)


def test_colors_and_background_are_exact(rng):
    for _ in range(20):
        scene = sample_scene(rng, 64, text_probability=0.0)
        img = render(scene)
        assert tuple(img[0, 0]) == BACKGROUNDS[scene.background]
        for o in scene.objects:  # the box center is inside every shape; a flat fill there
            color = img[int(o.cy), int(o.cx)] if o.shape != "triangle" else img[int(o.cy + o.size / 4), int(o.cx)]
            assert tuple(color) == COLORS[o.color]


def test_anti_aliased_edges(rng):
    img = render(Scene(64, "white", (ShapeObject("circle", "blue", 32.0, 32.0, 20.0),)))
    values = {tuple(v) for v in img.reshape(-1, 3)}
    assert len(values) > 5  # intermediate edge colors, not a two-color image


@pytest.mark.parametrize("canvas", [32, 64, 128, 512])
def test_placement_rules_at_any_canvas(canvas, rng):
    for _ in range(30):
        scene = sample_scene(rng, canvas)
        boxes = scene.boxes()
        m = MARGIN * scale(canvas)
        assert 1 <= len(boxes) <= 6
        for i, b in enumerate(boxes):
            assert b.x0 >= m - 1e-6 and b.y0 >= m - 1e-6 and b.x1 <= canvas - m + 1e-6 and b.y1 <= canvas - m + 1e-6
            for other in boxes[i + 1 :]:
                assert b.gap_to(other) >= m - 1e-6
        for o in scene.objects:
            assert 10 * scale(canvas) - 1e-6 <= o.size <= 24 * scale(canvas) + 1e-6
        assert render(scene).shape == (canvas, canvas, 3)


def test_canvas_limits():
    for bad in (31, 513):
        with pytest.raises(ValueError):
            check_canvas(bad)


def test_text_cap_height_and_centering():
    for cap in range(CAP_HEIGHT_RANGE[0], CAP_HEIGHT_RANGE[1] + 1):
        h_mask = word_mask_4x("H", cap_height_4x(cap))
        assert h_mask.shape[0] / 4 == pytest.approx(cap, abs=0.5)
    t = make_text("WORD", 32, 20, 12, "black")
    assert t.cx == pytest.approx(32, abs=0.25)


def test_render_is_deterministic():
    a = sample_scene(np.random.default_rng(7), 64)
    b = sample_scene(np.random.default_rng(7), 64)
    assert a == b
    assert np.array_equal(render(a), render(b))
