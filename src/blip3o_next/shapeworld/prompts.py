"""Prompts: structured requirements, the canonical templates, a parser for them, and training captions.

A `Requirement` is what a prompt asks for: groups of objects (each with optional shape,
color and size, and a count), relations between groups, an optional background and an
optional word. Canonical prompt text and the requirement convert both ways.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from .world import BACKGROUNDS, COLORS, MAX_OBJECTS, MAX_WORD_LEN, RELATIONS, SHAPES, SIZE_RANGES, Scene, article, size_class

CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr", "text", "dense")
GENEVAL_CATEGORIES = CATEGORIES[:6]  # overall = mean of these six
COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
WORD_COUNTS = {v: k for k, v in COUNT_WORDS.items()}
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass(frozen=True)
class ObjectSpec:
    """A group of `count` identical-looking objects; None means 'any'."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None  # small / medium / large
    count: int = 1


@dataclass(frozen=True)
class RelationSpec:
    """groups[subject] {relation} groups[object]; holds when it holds for every pair of members."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class Requirement:
    groups: tuple[ObjectSpec, ...] = field(default_factory=tuple)
    relations: tuple[RelationSpec, ...] = field(default_factory=tuple)
    background: str | None = None
    word: str | None = None
    word_color: str | None = None  # None: the default ink for the background

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Requirement":
        req = cls(
            groups=tuple(ObjectSpec(**g) for g in d.get("groups", ())),
            relations=tuple(RelationSpec(**r) for r in d.get("relations", ())),
            background=d.get("background"),
            word=d.get("word"),
            word_color=d.get("word_color"),
        )
        req.validate()
        return req

    def validate(self) -> None:
        for g in self.groups:
            if g.shape is not None and g.shape not in SHAPES:
                raise ValueError(f"unknown shape {g.shape!r}")
            if g.color is not None and g.color not in COLORS:
                raise ValueError(f"unknown color {g.color!r}")
            if g.size is not None and g.size not in SIZE_RANGES:
                raise ValueError(f"unknown size {g.size!r}")
            if not 1 <= g.count <= MAX_OBJECTS:
                raise ValueError(f"count {g.count} outside [1, {MAX_OBJECTS}]")
        if self.n_objects + (self.word is not None) > MAX_OBJECTS:
            raise ValueError(f"asks for more than {MAX_OBJECTS} objects")
        for r in self.relations:
            if r.relation not in RELATIONS or not (0 <= r.subject < len(self.groups) + 1 and 0 <= r.object < len(self.groups) + 1):
                raise ValueError(f"bad relation {r}")
        if self.background is not None and self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        if self.word is not None and not re.fullmatch(f"[A-Z]{{1,{MAX_WORD_LEN}}}", self.word):
            raise ValueError(f"word {self.word!r} is not 1-{MAX_WORD_LEN} uppercase letters A-Z")


# The text object takes part in relations as the group index len(groups).
def text_group_index(req: Requirement) -> int:
    return len(req.groups)


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str
    requirement: Requirement

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.text, "category": self.category, "requirement": self.requirement.to_dict()}


# ----------------------------------------------------------------------------- text of a requirement


def plural(noun: str) -> str:
    return noun + ("es" if noun.endswith("s") else "s")


def singular(noun: str) -> str:
    return noun[:-2] if noun.endswith("sses") else noun[:-1] if noun.endswith("s") else noun


def _head(words: list[str], count: int) -> str:
    return " ".join(words[:-1] + [plural(words[-1]) if count > 1 else words[-1]])


def noun_phrase(g: ObjectSpec, definite: bool = False) -> str:
    words = [w for w in (g.size, g.color, g.shape or "object") if w]
    head = _head(words, g.count)
    if g.count > 1:
        return f"{COUNT_WORDS[g.count]} {head}"
    return f"{'the' if definite else article(words[0])} {head}"


def word_phrase(req: Requirement) -> str:
    return f'the word "{req.word}"' + (f" in {req.word_color}" if req.word_color else "")


def requirement_text(req: Requirement, prefix: str = "a photo of ") -> str:
    """Canonical text: clauses in group order joined by a relation when one links neighbours, else 'and'."""
    phrases = [noun_phrase(g) for g in req.groups] + ([word_phrase(req)] if req.word else [])
    links = {(r.subject, r.object): r.relation for r in req.relations}
    parts = [phrases[0]]
    for i in range(1, len(phrases)):
        parts.append(links.get((i - 1, i), "and"))
        parts.append(phrases[i])
    text = prefix + " ".join(parts)
    if req.background:
        text += f" on a {req.background} background"
    return text


# ----------------------------------------------------------------------------- canonical suite


def random_word(rng: np.random.Generator) -> str:
    return "".join(rng.choice(list(LETTERS), size=int(rng.integers(1, MAX_WORD_LEN + 1))))


def _distinct(rng: np.random.Generator, pool: Sequence[str], k: int) -> list[str]:
    return [str(x) for x in rng.choice(list(pool), size=k, replace=False)]


def canonical_requirement(category: str, rng: np.random.Generator) -> Requirement:
    """Draw one requirement of a canonical category."""
    if category == "single_object":
        return Requirement(groups=(ObjectSpec(shape=_distinct(rng, SHAPES, 1)[0]),))
    if category == "two_object":
        a, b = _distinct(rng, SHAPES, 2)
        return Requirement(groups=(ObjectSpec(shape=a), ObjectSpec(shape=b)))
    if category == "counting":
        return Requirement(groups=(ObjectSpec(shape=_distinct(rng, SHAPES, 1)[0], count=int(rng.integers(2, 5))),))
    if category == "colors":
        return Requirement(groups=(ObjectSpec(shape=_distinct(rng, SHAPES, 1)[0], color=_distinct(rng, COLORS, 1)[0]),))
    if category == "position":
        a, b = _distinct(rng, SHAPES, 2)
        rel = _distinct(rng, RELATIONS, 1)[0]
        return Requirement(groups=(ObjectSpec(shape=a), ObjectSpec(shape=b)), relations=(RelationSpec(0, rel, 1),))
    if category == "color_attr":
        a, b = _distinct(rng, SHAPES, 2)
        c1, c2 = _distinct(rng, COLORS, 2)
        return Requirement(groups=(ObjectSpec(shape=a, color=c1), ObjectSpec(shape=b, color=c2)))
    if category == "text":
        return Requirement(word=random_word(rng))
    if category == "dense":
        return _dense_requirement(rng)
    raise ValueError(f"unknown category {category!r}; choose from {', '.join(CATEGORIES)}")


def _dense_requirement(rng: np.random.Generator) -> Requirement:
    n_clauses = int(rng.integers(2, 5))
    shapes = _distinct(rng, SHAPES, n_clauses)
    budget = MAX_OBJECTS - n_clauses  # extra objects beyond one per clause
    groups = []
    for shape in shapes:
        count = 1
        if budget > 0 and rng.random() < 0.3:
            count = 2
            budget -= 1
        color = _distinct(rng, COLORS, 1)[0] if rng.random() < 0.8 else None
        groups.append(ObjectSpec(shape=shape, color=color, count=count))
    relations = tuple(
        RelationSpec(i - 1, _distinct(rng, RELATIONS, 1)[0], i) for i in range(1, n_clauses) if rng.random() < 0.5
    )
    background = _distinct(rng, BACKGROUNDS, 1)[0] if rng.random() < 0.5 else None
    return Requirement(groups=tuple(groups), relations=relations, background=background)


def canonical_prompt(category: str, rng: np.random.Generator) -> Prompt:
    req = canonical_requirement(category, rng)
    prefix = "" if category == "dense" else "a photo of "
    return Prompt(requirement_text(req, prefix=prefix), category, req)


COMPOSITION = "composition"


def composition_prompt(rng: np.random.Generator) -> Prompt:
    """One or two shapes, each with a count (1-3) and maybe a colour: the skills of the single-object, two-object,
    counting and colours categories combined (e.g. "a photo of two red circles and a square"). Some draws are
    canonical prompts of those categories; RL prompt sets filter out the evaluation suite's."""
    shapes = _distinct(rng, SHAPES, int(rng.integers(1, 3)))
    groups = tuple(
        ObjectSpec(shape=shape, count=int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2])), color=_distinct(rng, COLORS, 1)[0] if rng.random() < 0.7 else None)
        for shape in shapes
    )
    req = Requirement(groups=groups)
    return Prompt(requirement_text(req), COMPOSITION, req)


def canonical_suite(per_category: int, seed: int = 0, categories: Sequence[str] = CATEGORIES) -> list[Prompt]:
    """A fixed, de-duplicated prompt suite: `per_category` prompts for each category (fewer if the category is smaller)."""
    out = []
    for ci, category in enumerate(categories):
        rng = np.random.default_rng([seed, ci])
        seen: dict[str, Prompt] = {}
        for _ in range(per_category * 50):
            if len(seen) == per_category:
                break
            p = canonical_prompt(category, rng)
            seen.setdefault(p.text, p)
        out.extend(seen.values())
    return out


# ----------------------------------------------------------------------------- parser

_TOKEN = re.compile(r'"[^"]*"|[a-z]+', re.IGNORECASE)
_QUANTITY = {"a": 1, "an": 1, **WORD_COUNTS}


class PromptParseError(ValueError):
    pass


def parse_prompt(text: str) -> Requirement:
    """Parse canonical prompt text (any category, including dense) back into its requirement."""
    tokens = _TOKEN.findall(text.strip())
    pos = 0

    def peek(k: int = 0) -> str | None:
        return tokens[pos + k].lower() if pos + k < len(tokens) else None

    def expect(*words: str) -> None:
        nonlocal pos
        for w in words:
            if peek() != w:
                raise PromptParseError(f"expected {w!r} at word {pos + 1} of {text!r}")
            pos += 1

    if tokens[:3] and [t.lower() for t in tokens[:3]] == ["a", "photo", "of"]:
        pos = 3
    groups: list[ObjectSpec] = []
    word = word_color = None
    clause_ids: list[int] = []  # group index of each clause in order (text = -1 until known)
    connectors: list[str] = []
    while True:
        if peek() == "the" and peek(1) == "word":
            pos += 2
            if pos >= len(tokens) or not tokens[pos].startswith('"'):
                raise PromptParseError(f'expected a quoted word after "the word" in {text!r}')
            if word is not None:
                raise PromptParseError(f"more than one word in {text!r}")
            word = tokens[pos].strip('"')
            pos += 1
            if peek() == "in" and peek(1) in COLORS:
                word_color = peek(1)
                pos += 2
            clause_ids.append(-1)
        else:
            q = peek()
            if q not in _QUANTITY:
                raise PromptParseError(f"expected a, an, one..four or 'the word' at word {pos + 1} of {text!r}")
            count = _QUANTITY[q]
            pos += 1
            size = color = None
            if peek() in SIZE_RANGES:
                size = peek()
                pos += 1
            if peek() in COLORS:
                color = peek()
                pos += 1
            noun = peek() or ""
            base = singular(noun) if count > 1 else noun
            if base not in SHAPES and base != "object" or (count > 1 and noun != plural(base)):
                raise PromptParseError(f"unknown shape {noun!r} in {text!r}")
            pos += 1
            groups.append(ObjectSpec(shape=None if base == "object" else base, color=color, size=size, count=count))
            clause_ids.append(len(groups) - 1)
        if peek() is None or peek() == "on":
            break
        two = f"{peek()} {peek(1)}"
        if two in RELATIONS:
            connectors.append(two)
            pos += 2
        elif peek() in RELATIONS:
            connectors.append(peek())
            pos += 1
        elif peek() == "and":
            connectors.append("and")
            pos += 1
        else:
            raise PromptParseError(f"unexpected {tokens[pos]!r} in {text!r}")
    background = None
    if peek() == "on":
        expect("on", "a")
        background = peek()
        if background not in BACKGROUNDS:
            raise PromptParseError(f"unknown background {background!r} in {text!r}")
        pos += 1
        expect("background")
    if pos != len(tokens):
        raise PromptParseError(f"unexpected {tokens[pos]!r} in {text!r}")
    text_index = len(groups)
    ids = [text_index if c == -1 else c for c in clause_ids]
    relations = tuple(RelationSpec(ids[i], c, ids[i + 1]) for i, c in enumerate(connectors) if c != "and")
    req = Requirement(groups=tuple(groups), relations=relations, background=background, word=word, word_color=word_color)
    try:
        req.validate()
    except ValueError as e:
        raise PromptParseError(f"{e} in {text!r}") from None
    return req


# ----------------------------------------------------------------------------- training captions

_LEADS = ("a photo of ", "", "an image of ", "a picture of ", "a drawing of ", "a rendering of ", "there is ")
_REL_WORDS = {
    "left of": ("left of", "to the left of", "on the left of"),
    "right of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over", "on top of"),
    "below": ("below", "under", "beneath"),
}
_DIGITS = {2: "2", 3: "3", 4: "4"}


def _paraphrase_np(g: ObjectSpec, rng: np.random.Generator) -> str:
    words = [w for w in (g.size, g.color, g.shape or "shape") if w]
    noun = _head(words, g.count)
    if g.count == 1:
        return f"{rng.choice([article(words[0]), 'one'])} {noun}"
    return f"{rng.choice([COUNT_WORDS[g.count], _DIGITS[g.count]])} {noun}"


def paraphrase(req: Requirement, rng: np.random.Generator, background: str | None = None) -> str:
    """One free-form phrasing of a requirement (optionally naming the scene's background)."""
    phrases = [_paraphrase_np(g, rng) for g in req.groups]
    if req.word:
        color = f" in {req.word_color}" if req.word_color else ""
        phrases.append(str(rng.choice([f'the word "{req.word}"', f'the text "{req.word}"', f'"{req.word}" written']) + color))
    links = {(r.subject, r.object): r.relation for r in req.relations}
    parts = [phrases[0]]
    for i in range(1, len(phrases)):
        rel = links.get((i - 1, i))
        parts.append(str(rng.choice(_REL_WORDS[rel])) if rel else str(rng.choice(["and", "and", "with", ","])))
        parts.append(phrases[i])
    text = str(rng.choice(_LEADS)) + " ".join(parts).replace(" ,", ",")
    bg = req.background or background
    if bg:
        text += str(rng.choice([f" on a {bg} background", f" against a {bg} backdrop", f", {bg} background"]))
    return text


def describe_scene(scene: Scene) -> Requirement:
    """The most specific requirement a scene satisfies: every object with shape, color and size, left to right."""
    objects = sorted(scene.objects, key=lambda o: (o.cx, o.cy))
    groups = tuple(ObjectSpec(shape=o.shape, color=o.color, size=size_class(o.size, scene.canvas)) for o in objects)
    word = scene.text.word if scene.text else None
    word_color = scene.text.color if scene.text and scene.text.color in COLORS else None
    return Requirement(groups=groups, background=scene.background, word=word, word_color=word_color)


def captions(req: Requirement, scene: Scene, rng: np.random.Generator, n: int = 4) -> list[str]:
    """Several distinct captions for a scene drawn for `req`: the canonical text, paraphrases, a full description."""
    out = [requirement_text(req)]
    full = describe_scene(scene)
    for k in range(n * 4):
        if len(out) >= n:
            break
        if k % 3 == 2:
            c = paraphrase(full, rng)
        else:
            c = paraphrase(req, rng, background=scene.background if rng.random() < 0.5 else None)
        if c not in out:
            out.append(c)
    return out
