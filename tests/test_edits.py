"""Edit pairs: all nine categories, unique referents, canonical instructions, correct expected targets."""

import numpy as np
import pytest

from blip3o_next.shapeworld.edits import (
    ADDED_SIZE, EDIT_CATEGORIES, RESIZE_FACTORS, EditError, apply_edit, edit_suite, find_referent, parse_instruction,
    paraphrase_instruction, sample_edit, EditSpec,
)
from blip3o_next.shapeworld.world import region_holds, relation_holds


@pytest.mark.parametrize("category", EDIT_CATEGORIES)
def test_edit_pairs(category):
    rng = np.random.default_rng(5)
    for _ in range(20):
        e = sample_edit(category, rng)
        assert parse_instruction(e.instruction) == e.spec
        s, t, spec = e.source, e.target, e.spec
        if spec.color:
            assert sum(o.color == spec.color and o.shape == spec.shape for o in s.objects) == 1  # unique referent
        if category == "keep":
            assert t == s
        elif category == "remove":
            assert len(t.objects) == len(s.objects) - 1
        elif category == "add":
            new = t.objects[-1]
            assert len(t.objects) == len(s.objects) + 1 and (new.color, new.shape) == (spec.new_color, spec.new_shape)
            if spec.relation:
                anchor = next(o for o in s.objects if (o.color, o.shape) == (spec.anchor_color, spec.anchor_shape))
                assert relation_holds(new.box, spec.relation, anchor.box, 64)
            else:
                assert region_holds(new.box, spec.region, 64)
        elif category == "move":
            moved = next(o for o in t.objects if (o.color, o.shape) == (spec.color, spec.shape))
            assert region_holds(moved.box, spec.region, 64)
        elif category == "resize":
            old = next(o for o in s.objects if (o.color, o.shape) == (spec.color, spec.shape))
            new = next(o for o in t.objects if (o.color, o.shape) == (spec.color, spec.shape))
            assert new.size == pytest.approx(old.size * RESIZE_FACTORS[spec.direction]) and (new.cx, new.cy) == (old.cx, old.cy)
        elif category == "background":
            assert t.background == spec.background != s.background and t.objects == s.objects
        elif category == "text":
            assert t.text.word == spec.word != s.text.word
            assert abs(t.text.cx - s.text.cx) <= 0.25 and abs(t.text.cy - s.text.cy) <= 0.25
        elif category in ("recolor", "replace"):
            assert len(t.objects) == len(s.objects) and t != s


def test_paraphrases_differ_from_canonical(rng):
    e = sample_edit("recolor", rng)
    assert paraphrase_instruction(e.spec, rng) != e.instruction


def test_missing_referent_is_an_edit_error(rng):
    e = sample_edit("remove", rng)
    spec = EditSpec("remove", color=e.spec.color, shape="star" if e.spec.shape != "star" else "circle")
    if not any((o.color, o.shape) == (spec.color, spec.shape) for o in e.source.objects):
        with pytest.raises(EditError):
            apply_edit(e.source, spec, rng)


def test_instruction_parser():
    assert parse_instruction("Make the red circle bigger.").direction == "bigger"
    assert parse_instruction('change the text to "OK"').word == "OK"
    for bad in ("make it nicer", 'change the text to "ok"', "remove the red banana", ""):
        with pytest.raises(ValueError):
            parse_instruction(bad)


def test_suite_is_deterministic():
    a, b = edit_suite(2, seed=9), edit_suite(2, seed=9)
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    assert len(a) == 2 * len(EDIT_CATEGORIES)


@pytest.mark.parametrize("category", ["add", "move"])
def test_nearest_placement_makes_the_target_a_function_of_source_and_instruction(category):
    """With placement="nearest" add and move put the object at one place per pair (the same whatever the random
    draws), which still satisfies the instruction; the other categories do not depend on placement."""
    for seed in range(20):
        pair = sample_edit(category, np.random.default_rng(seed), placement="nearest")
        again = apply_edit(pair.source, pair.spec, np.random.default_rng(seed + 1000), placement="nearest")
        assert again == pair.target
        new = [o for o in pair.target.objects if o not in pair.source.objects]
        assert len(new) == 1
        obj = new[0]
        if pair.spec.region:
            assert region_holds(obj.box, pair.spec.region, 64)
        else:
            anchor = pair.source.objects[find_referent(pair.source, pair.spec.anchor_color, pair.spec.anchor_shape)]
            assert relation_holds(obj.box, pair.spec.relation, anchor.box, 64)
        if category == "add":
            assert obj.size == ADDED_SIZE
    with pytest.raises(ValueError, match="unknown placement"):
        apply_edit(pair.source, pair.spec, np.random.default_rng(0), placement="random")
