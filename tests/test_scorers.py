"""Scorers: ground truth passes 100%, deliberately wrong images fail 100%; OCR reward; edit consistency."""

import dataclasses

import numpy as np
import pytest

from blip3o_next.eval.scorers import PSNR_CAP, check_edit, check_t2i, ocr_reward, summarize_edits, summarize_t2i
from blip3o_next.shapeworld.edits import EDIT_CATEGORIES, edit_suite
from blip3o_next.shapeworld.prompts import GENEVAL_CATEGORIES, canonical_suite
from blip3o_next.shapeworld.render import make_text, render
from blip3o_next.shapeworld.sampler import place_shape, sample_scene_for
from blip3o_next.shapeworld.world import BACKGROUNDS, COLORS, SHAPES, default_text_color
from blip3o_next.eval.verifier import SceneParser

PARSER = SceneParser()


@pytest.fixture(scope="module")
def suite_scenes():
    rng = np.random.default_rng(0)
    suite = canonical_suite(12, seed=0)
    return suite, [sample_scene_for(p.requirement, rng, 64) for p in suite]


def test_ground_truth_passes_all(suite_scenes):
    suite, scenes = suite_scenes
    parsed = PARSER(np.stack([render(s) for s in scenes]))
    results = [check_t2i(p.requirement, s) for p, s in zip(suite, parsed)]
    assert all(r.passed and r.partial == 1.0 for r in results), [(p.text, r.reasons) for p, r in zip(suite, results) if not r.passed]
    summary = summarize_t2i([p.category for p in suite], results)
    assert summary["overall"] == 1.0 and set(GENEVAL_CATEGORIES) <= set(summary["categories"])


def corruptions(req, scene, rng):
    """Scenes that violate the requirement in one way each (only ways that apply to it)."""
    out = {}
    S = scene.canvas
    spot = place_shape(rng, S, str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), 14.0, scene.boxes())
    if spot is not None and len(scene.boxes()) < 6:
        out["extra object"] = scene.with_objects(scene.objects + (spot,))
    if scene.objects:
        out["missing object"] = scene.with_objects(scene.objects[1:])
    specified_color = [i for i, o in enumerate(scene.objects) if any(g.color == o.color and g.shape == o.shape for g in req.groups)]
    if specified_color:
        i = specified_color[0]
        new = next(c for c in COLORS if c != scene.objects[i].color and all(g.color != c for g in req.groups))
        out["wrong color"] = scene.with_objects(o if j != i else dataclasses.replace(o, color=new) for j, o in enumerate(scene.objects))
    if scene.objects and any(g.shape for g in req.groups):
        new = next(s for s in SHAPES if all(g.shape != s for g in req.groups))
        out["wrong shape"] = scene.with_objects([dataclasses.replace(scene.objects[0], shape=new)] + list(scene.objects[1:]))
    if req.relations:  # a point reflection reverses every left/right and above/below relation
        out["wrong relation"] = scene.with_objects(dataclasses.replace(o, cx=S - o.cx, cy=S - o.cy) for o in scene.objects)
    if req.word:
        t = scene.text
        word = "Q" if t.word != "Q" else "Z"
        out["wrong word"] = dataclasses.replace(scene, text=make_text(word, t.cx, t.cy, t.cap_height, t.color))
    elif spot is None or True:
        if len(scene.boxes()) < 6:
            text = make_text("HI", S / 2, S / 2, 12, default_text_color(scene.background))
            if all(text.box.gap_to(b) >= 2 for b in scene.boxes()) and text.box.y0 > 2:
                out["extra word"] = dataclasses.replace(scene, text=text)
    if req.background:
        new_bg = next(b for b in BACKGROUNDS if b != req.background)
        text = scene.text and dataclasses.replace(scene.text, color=default_text_color(new_bg))
        out["wrong background"] = dataclasses.replace(scene, background=new_bg, text=text)
    return out


def test_wrong_images_fail_all(suite_scenes):
    suite, scenes = suite_scenes
    rng = np.random.default_rng(1)
    cases = [(p, name, bad) for p, s in zip(suite, scenes) for name, bad in corruptions(p.requirement, s, rng).items()]
    parsed = PARSER(np.stack([render(bad) for _, _, bad in cases]))
    passed = [(p.text, name) for (p, name, _), got in zip(cases, parsed) if check_t2i(p.requirement, got).passed]
    assert not passed, passed
    kinds = {name for _, name, _ in cases}
    assert {"extra object", "missing object", "wrong color", "wrong shape", "wrong relation", "wrong word", "wrong background"} <= kinds


def test_partial_credit_orders_mistakes(suite_scenes):
    suite, scenes = suite_scenes
    p, s = next((p, s) for p, s in zip(suite, scenes) if p.category == "color_attr")
    wrong_one = s.with_objects([dataclasses.replace(s.objects[0], color=next(c for c in COLORS if c not in (s.objects[0].color, s.objects[1].color)))] + list(s.objects[1:]))
    r_ok, r_bad = check_t2i(p.requirement, PARSER.parse(render(s))), check_t2i(p.requirement, PARSER.parse(render(wrong_one)))
    assert r_ok.partial == 1.0 and 0.0 < r_bad.partial < 1.0 and not r_bad.passed


def test_ocr_reward():
    assert ocr_reward("CAT", "CAT") == 1.0
    assert ocr_reward("c a t", "CAT") == 1.0  # case and spaces ignored
    assert ocr_reward("THECATS", "CAT") == 1.0  # contained
    assert ocr_reward("CAR", "CAT") == pytest.approx(2 / 3)
    assert ocr_reward(None, "CAT") == 0.0 and ocr_reward("XYZWVU", "AB") == 0.0
    with pytest.raises(ValueError):
        ocr_reward("A", " ")


@pytest.fixture(scope="module")
def edits():
    pairs = edit_suite(8, seed=2)
    return pairs, np.stack([render(e.source) for e in pairs]), np.stack([render(e.target) for e in pairs])


def test_edit_targets_pass_with_perfect_consistency(edits):
    pairs, sources, targets = edits
    results = [check_edit(e.source, e.spec, o, s, t, e.target) for e, o, s, t in zip(pairs, PARSER(targets), sources, targets)]
    assert all(r.passed for r in results), [(e.instruction, r.reasons) for e, r in zip(pairs, results) if not r.passed]
    assert all(r.psnr in (None, PSNR_CAP) for r in results)
    summary = summarize_edits([e.spec.category for e in pairs], results)
    assert summary["overall"]["success"] == 1.0 and set(summary["categories"]) == set(EDIT_CATEGORIES)


def test_untouched_source_fails_every_non_keep_edit(edits):
    pairs, sources, _ = edits
    for e, o, s in zip(pairs, PARSER(sources), sources):
        assert check_edit(e.source, e.spec, o, s, s).passed == (e.spec.category == "keep"), e.instruction


def test_edit_consistency_drops_when_untouched_pixels_change(edits):
    pairs, sources, targets = edits
    i = next(i for i, e in enumerate(pairs) if e.spec.category == "recolor")
    noisy = np.clip(targets[i].astype(int) + np.random.default_rng(0).normal(0, 25, targets[i].shape), 0, 255).astype(np.uint8)
    r = check_edit(pairs[i].source, pairs[i].spec, pairs[i].target, sources[i], noisy, pairs[i].target)
    assert r.psnr is not None and r.psnr < 30
