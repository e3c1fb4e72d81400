"""Edit pairs: a source scene, an instruction (canonical or paraphrased), and the expected target scene.

The nine categories (`EDIT_CATEGORIES`) and their canonical instructions are ShapeWorld v1's; the
referent (`the {color} {shape}`) is always unique in the source scene.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .prompts import random_word
from .render import make_text
from .sampler import PlacementError, fits, place_shape, place_shape_nearest, sample_scene
from .world import (
    BACKGROUNDS,
    COLORS,
    REGIONS,
    RELATIONS,
    SHAPES,
    SAMPLING_SLACK,
    SIZE_RANGES,
    Scene,
    ShapeObject,
    article,
    check_canvas,
    default_text_color,
    region_holds,
    relation_holds,
    scale,
)

EDIT_CATEGORIES = ("add", "remove", "replace", "recolor", "move", "resize", "background", "text", "keep")
RESIZE_FACTORS = {"bigger": 1.4, "smaller": 0.7}
# Where add and move put an object: "uniform" draws any free place that satisfies the instruction (the data
# engine's default); "nearest" takes the one nearest to a fixed point (added objects: the anchor's centre or the
# region's middle, at size ADDED_SIZE; moved objects: where they were), so the target is a function of the pair.
PLACEMENTS = ("uniform", "nearest")
ADDED_SIZE = 16
REGION_POINTS = {"left side": (0.2, 0.5), "right side": (0.8, 0.5), "top": (0.5, 0.2), "bottom": (0.5, 0.8), "center": (0.5, 0.5)}


class EditError(ValueError):
    """The edit cannot be applied to this source scene (e.g. its referent is missing or not unique)."""


@dataclass(frozen=True)
class EditSpec:
    """What an instruction asks for. Fields unused by a category stay None."""

    category: str
    color: str | None = None  # referent color (remove/replace/recolor/move/resize)
    shape: str | None = None  # referent shape
    new_color: str | None = None  # add/replace/recolor
    new_shape: str | None = None  # add/replace
    relation: str | None = None  # add: new object {relation} the anchor
    anchor_color: str | None = None
    anchor_shape: str | None = None
    region: str | None = None  # add/move
    direction: str | None = None  # resize: bigger / smaller
    background: str | None = None  # background
    word: str | None = None  # text

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EditSpec":
        return cls(**d)


@dataclass(frozen=True)
class EditPair:
    source: Scene
    instruction: str
    spec: EditSpec
    target: Scene

    @property
    def category(self) -> str:
        return self.spec.category

    def to_dict(self) -> dict[str, Any]:
        return {
            "instruction": self.instruction,
            "category": self.spec.category,
            "spec": self.spec.to_dict(),
            "source_scene": self.source.to_dict(),
            "target_scene": self.target.to_dict(),
        }


# ----------------------------------------------------------------------------- text


def _np(color: str, shape: str) -> str:
    return f"{article(color)} {color} {shape}"


def instruction_text(spec: EditSpec) -> str:
    """The canonical instruction for an edit."""
    c = spec.category
    the = f"the {spec.color} {spec.shape}"
    if c == "add":
        new = _np(spec.new_color, spec.new_shape)
        if spec.relation:
            return f"add {new} {spec.relation} the {spec.anchor_color} {spec.anchor_shape}"
        return f"add {new} on the {spec.region}"
    if c == "remove":
        return f"remove {the}"
    if c == "replace":
        return f"replace {the} with {_np(spec.new_color, spec.new_shape)}"
    if c == "recolor":
        return f"make {the} {spec.new_color}"
    if c == "move":
        return f"move {the} to the {spec.region}"
    if c == "resize":
        return f"make {the} {spec.direction}"
    if c == "background":
        return f"change the background to {spec.background}"
    if c == "text":
        return f'change the text to "{spec.word}"'
    if c == "keep":
        return "keep the image unchanged"
    raise ValueError(f"unknown edit category {c!r}")


_PARAPHRASES = {
    "add": ("put {new} {where}", "place {new} {where}", "draw {new} {where}", "insert {new} {where}"),
    "remove": ("delete {the}", "take away {the}", "erase {the}", "get rid of {the}"),
    "replace": ("swap {the} for {new}", "turn {the} into {new}", "substitute {new} for {the}"),
    "recolor": ("color {the} {new_color}", "paint {the} {new_color}", "change the color of {the} to {new_color}"),
    "move": ("put {the} on the {region}", "shift {the} to the {region}", "relocate {the} to the {region}"),
    "resize": ("{verb} {the}", "make {the} {comparative}"),
    "background": ("make the background {background}", "use a {background} background", "switch to a {background} background"),
    "text": ('make the text say "{word}"', 'replace the text with "{word}"', 'rewrite the word as "{word}"'),
    "keep": ("leave the image as it is", "do not change anything", "reproduce the image exactly", "change nothing"),
}
_RESIZE_WORDS = {"bigger": (("enlarge", "grow"), ("larger", "bigger")), "smaller": (("shrink", "reduce"), ("smaller", "tinier"))}


def paraphrase_instruction(spec: EditSpec, rng: np.random.Generator) -> str:
    """A free-form phrasing of an edit, for training."""
    template = str(rng.choice(_PARAPHRASES[spec.category]))
    fields = {
        "the": f"the {spec.color} {spec.shape}",
        "new": _np(spec.new_color, spec.new_shape) if spec.new_color and spec.new_shape else "",
        "new_color": spec.new_color,
        "region": spec.region,
        "background": spec.background,
        "word": spec.word,
    }
    if spec.category == "add":
        fields["where"] = (
            f"{spec.relation} the {spec.anchor_color} {spec.anchor_shape}" if spec.relation else f"on the {spec.region}"
        )
    if spec.category == "resize":
        verbs, comparatives = _RESIZE_WORDS[spec.direction]
        fields["verb"], fields["comparative"] = str(rng.choice(verbs)), str(rng.choice(comparatives))
    return template.format(**fields)


_C = "|".join(COLORS)
_S = "|".join(SHAPES)
_R = "|".join(RELATIONS)
_G = "|".join(REGIONS)
_B = "|".join(BACKGROUNDS)
_PATTERNS = (
    ("add", rf"add an? (?P<new_color>{_C}) (?P<new_shape>{_S}) (?P<relation>{_R}) the (?P<anchor_color>{_C}) (?P<anchor_shape>{_S})"),
    ("add", rf"add an? (?P<new_color>{_C}) (?P<new_shape>{_S}) on the (?P<region>{_G})"),
    ("remove", rf"remove the (?P<color>{_C}) (?P<shape>{_S})"),
    ("replace", rf"replace the (?P<color>{_C}) (?P<shape>{_S}) with an? (?P<new_color>{_C}) (?P<new_shape>{_S})"),
    ("resize", rf"make the (?P<color>{_C}) (?P<shape>{_S}) (?P<direction>bigger|smaller)"),
    ("recolor", rf"make the (?P<color>{_C}) (?P<shape>{_S}) (?P<new_color>{_C})"),
    ("move", rf"move the (?P<color>{_C}) (?P<shape>{_S}) to the (?P<region>{_G})"),
    ("background", rf"change the background to (?P<background>{_B})"),
    ("text", r'(?i:change the text to) "(?-i:(?P<word>[A-Z]{1,4}))"'),
    ("keep", r"keep the image unchanged"),
)


def parse_instruction(text: str) -> EditSpec:
    """Parse a canonical instruction (case-insensitive, except the quoted word; a final period is allowed)."""
    cleaned = " ".join(text.strip().rstrip(".").split())
    for category, pattern in _PATTERNS:
        m = re.fullmatch(pattern, cleaned, 0 if category == "text" else re.IGNORECASE)
        if m:
            values = {k: v.lower() if k != "word" else v for k, v in m.groupdict().items()}
            return EditSpec(category=category, **values)
    raise ValueError(f"not a canonical edit instruction: {text!r}")


# ----------------------------------------------------------------------------- applying edits


def find_referent(scene: Scene, color: str, shape: str) -> int:
    """Index of the unique object with this color and shape."""
    hits = [i for i, o in enumerate(scene.objects) if o.color == color and o.shape == shape]
    if len(hits) != 1:
        raise EditError(f"'the {color} {shape}' matches {len(hits)} objects in the source scene (need exactly 1)")
    return hits[0]


def _boxes_except(scene: Scene, index: int | None) -> list:
    boxes = [o.box for i, o in enumerate(scene.objects) if i != index]
    return boxes + ([scene.text.box] if scene.text else [])


def _replace_object(scene: Scene, index: int, obj: ShapeObject) -> Scene:
    objects = list(scene.objects)
    objects[index] = obj
    return scene.with_objects(objects)


def _place(placement: str, rng: np.random.Generator, canvas: int, shape: str, color: str, size: float, occupied: list,
           accept, point: tuple[float, float]) -> ShapeObject | None:
    """An added or moved object's place: a uniformly drawn free one, or with "nearest" the free one nearest `point`."""
    if placement == "nearest":
        return place_shape_nearest(canvas, shape, color, size, occupied, point, accept)
    return place_shape(rng, canvas, shape, color, size, occupied, accept)


def apply_edit(source: Scene, spec: EditSpec, rng: np.random.Generator, placement: str = "uniform") -> Scene:
    """One valid target scene for `spec` applied to `source` (add/move place the object as `placement` says)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}; choose from {', '.join(PLACEMENTS)}")
    S = source.canvas
    c = spec.category
    if c == "keep":
        return source
    if c == "background":
        if spec.background == source.background:
            raise EditError(f"the background is already {spec.background}")
        text = source.text
        if text is not None and text.color == default_text_color(source.background):
            text = replace(text, color=default_text_color(spec.background))
        return replace(source, background=spec.background, text=text)
    if c == "text":
        if source.text is None:
            raise EditError("the source scene has no text")
        if spec.word == source.text.word:
            raise EditError(f'the text already reads "{spec.word}"')
        t = source.text
        new = make_text(spec.word, t.cx, t.cy, t.cap_height, t.color)
        if not fits(new.box, S, [o.box for o in source.objects]):
            raise EditError(f'"{spec.word}" does not fit where the text is')
        return replace(source, text=new)
    if c == "add":
        anchor = None
        if spec.relation:
            anchor = source.objects[find_referent(source, spec.anchor_color, spec.anchor_shape)].box
        if len(source.objects) + (source.text is not None) >= 6:
            raise EditError("the scene already holds 6 objects")

        def accept(box) -> bool:
            if anchor is not None:
                return relation_holds(box, spec.relation, anchor, S, slack=SAMPLING_SLACK)
            return region_holds(box, spec.region, S, slack=SAMPLING_SLACK)

        size = ADDED_SIZE * scale(S) if placement == "nearest" else float(rng.integers(12, 21)) * scale(S)
        point = (anchor.cx, anchor.cy) if anchor is not None else tuple(v * S for v in REGION_POINTS[spec.region])
        obj = _place(placement, rng, S, spec.new_shape, spec.new_color, size, _boxes_except(source, None), accept, point)
        if obj is None:
            raise EditError("no free place for the new object")
        return source.with_objects(source.objects + (obj,))
    index = find_referent(source, spec.color, spec.shape)
    old = source.objects[index]
    others = _boxes_except(source, index)
    if c == "remove":
        return source.with_objects(o for i, o in enumerate(source.objects) if i != index)
    if c == "recolor":
        if spec.new_color == old.color:
            raise EditError(f"the {old.shape} is already {old.color}")
        return _replace_object(source, index, replace(old, color=spec.new_color))
    if c == "replace":
        if spec.new_shape == old.shape:
            raise EditError("replace needs a different shape (use recolor to change only the color)")
        return _replace_object(source, index, replace(old, shape=spec.new_shape, color=spec.new_color))
    if c == "resize":
        new = replace(old, size=old.size * RESIZE_FACTORS[spec.direction])
        lo, hi = SIZE_RANGES["small"][0] * scale(S), SIZE_RANGES["large"][1] * scale(S)
        if not (lo <= new.size <= hi) or not fits(new.box, S, others):
            raise EditError(f"the {old.shape} cannot be made {spec.direction} within the size limits and free space")
        return _replace_object(source, index, new)
    if c == "move":
        if region_holds(old.box, spec.region, S):
            raise EditError(f"the {old.shape} is already on the {spec.region}")
        in_region = lambda box: region_holds(box, spec.region, S, slack=SAMPLING_SLACK)  # noqa: E731
        moved = _place(placement, rng, S, old.shape, old.color, old.size, others, in_region, (old.cx, old.cy))
        if moved is None:
            raise EditError(f"no free place on the {spec.region}")
        return _replace_object(source, index, moved)
    raise ValueError(f"unknown edit category {c!r}")


def _unique_referents(scene: Scene) -> list[int]:
    keys = [(o.color, o.shape) for o in scene.objects]
    return [i for i, k in enumerate(keys) if keys.count(k) == 1]


def random_spec(source: Scene, category: str, rng: np.random.Generator) -> EditSpec:
    """A random edit of `category` that refers only to unique objects of `source` (may still fail to apply)."""
    pick = lambda pool: str(rng.choice(list(pool)))  # noqa: E731
    if category == "keep":
        return EditSpec("keep")
    if category == "background":
        return EditSpec("background", background=pick(b for b in BACKGROUNDS if b != source.background))
    if category == "text":
        return EditSpec("text", word=random_word(rng))
    unique = _unique_referents(source)
    if category == "add":
        new = dict(new_color=pick(COLORS), new_shape=pick(SHAPES))
        if unique and rng.random() < 0.5:
            a = source.objects[int(rng.choice(unique))]
            return EditSpec("add", relation=pick(RELATIONS), anchor_color=a.color, anchor_shape=a.shape, **new)
        return EditSpec("add", region=pick(REGIONS), **new)
    if not unique:
        raise EditError("the source scene has no uniquely described object")
    o = source.objects[int(rng.choice(unique))]
    ref = dict(color=o.color, shape=o.shape)
    if category == "remove":
        return EditSpec("remove", **ref)
    if category == "recolor":
        return EditSpec("recolor", new_color=pick(c for c in COLORS if c != o.color), **ref)
    if category == "replace":
        return EditSpec("replace", new_color=pick(COLORS), new_shape=pick(s for s in SHAPES if s != o.shape), **ref)
    if category == "move":
        return EditSpec("move", region=pick(REGIONS), **ref)
    if category == "resize":
        return EditSpec("resize", direction=pick(RESIZE_FACTORS), **ref)
    raise ValueError(f"unknown edit category {category!r}; choose from {', '.join(EDIT_CATEGORIES)}")


def _source_for(category: str, rng: np.random.Generator, canvas: int) -> Scene:
    text_probability = 1.0 if category == "text" else 0.25
    max_shapes = 4 if category == "add" else 5
    return sample_scene(rng, canvas, max_shapes=max_shapes, text_probability=text_probability, colored_text_probability=0.0)


def sample_edit(
    category: str, rng: np.random.Generator, canvas: int = 64, paraphrase: bool = False, tries: int = 200, placement: str = "uniform"
) -> EditPair:
    """A random edit pair of one category; the instruction is canonical unless `paraphrase`; add and move place
    their object as `placement` says (see PLACEMENTS)."""
    check_canvas(canvas)
    if category not in EDIT_CATEGORIES:
        raise ValueError(f"unknown edit category {category!r}; choose from {', '.join(EDIT_CATEGORIES)}")
    for _ in range(tries):
        source = _source_for(category, rng, canvas)
        try:
            spec = random_spec(source, category, rng)
            target = apply_edit(source, spec, rng, placement)
        except EditError:
            continue
        text = paraphrase_instruction(spec, rng) if paraphrase else instruction_text(spec)
        return EditPair(source, text, spec, target)
    raise PlacementError(f"could not sample a {category} edit on a {canvas}px canvas")


def edit_suite(per_category: int, seed: int = 0, canvas: int = 64, categories=EDIT_CATEGORIES) -> list[EditPair]:
    """A fixed suite of canonical edits: `per_category` for each category, seeded per category."""
    out = []
    for ci, category in enumerate(categories):
        rng = np.random.default_rng([seed, 1000 + ci])
        out.extend(sample_edit(category, rng, canvas) for _ in range(per_category))
    return out
