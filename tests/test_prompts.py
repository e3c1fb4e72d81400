"""Canonical prompts follow the contract's templates; the parser inverts them; captions vary."""

import re

import numpy as np
import pytest

from blip3o_next.shapeworld.prompts import (
    CATEGORIES, PromptParseError, canonical_prompt, canonical_suite, captions, parse_prompt,
)
from blip3o_next.shapeworld.sampler import sample_scene_for

S_ = "(circle|square|triangle|diamond|star|cross)"
C_ = "(red|orange|yellow|green|cyan|blue|purple|pink)"
TEMPLATES = {
    "single_object": rf"a photo of an? {S_}",
    "two_object": rf"a photo of an? {S_} and an? {S_}",
    "counting": r"a photo of (two|three|four) (circles|squares|triangles|diamonds|stars|crosses)",
    "colors": rf"a photo of an? {C_} {S_}",
    "position": rf"a photo of an? {S_} (left of|right of|above|below) an? {S_}",
    "color_attr": rf"a photo of an? {C_} {S_} and an? {C_} {S_}",
    "text": r'a photo of the word "[A-Z]{1,4}"',
}


@pytest.mark.parametrize("category", CATEGORIES)
def test_canonical_templates_and_round_trip(category):
    rng = np.random.default_rng(0)
    for _ in range(40):
        p = canonical_prompt(category, rng)
        if category in TEMPLATES:
            assert re.fullmatch(TEMPLATES[category], p.text), p.text
        assert parse_prompt(p.text) == p.requirement
        for a, noun in re.findall(r"\b(a|an) (\w+)", p.text):
            assert (a == "an") == (noun[0] in "aeiou"), p.text


def test_dense_prompts_have_two_to_four_clauses():
    rng = np.random.default_rng(1)
    for _ in range(50):
        req = canonical_prompt("dense", rng).requirement
        assert 2 <= len(req.groups) <= 4 and req.n_objects <= 6


def test_suite_is_fixed_and_deduplicated():
    a, b = canonical_suite(50, seed=3), canonical_suite(50, seed=3)
    assert [p.text for p in a] == [p.text for p in b]
    assert len({p.text for p in a}) == len(a)
    assert {p.category for p in a} == set(CATEGORIES)


def test_parser_examples_and_errors():
    req = parse_prompt("two red circles above a blue star on a black background")
    assert req.background == "black" and req.groups[0].count == 2 and req.relations[0].relation == "above"
    for bad in ("a photo of a banana", "a photo of two crosss", "a red circle on a purple background", ""):
        with pytest.raises(PromptParseError):
            parse_prompt(bad)


def test_captions_vary_and_start_with_canonical(rng):
    p = canonical_prompt("position", rng)
    scene = sample_scene_for(p.requirement, rng)
    caps = captions(p.requirement, scene, rng, n=4)
    assert caps[0] == p.text and len(set(caps)) == 4
