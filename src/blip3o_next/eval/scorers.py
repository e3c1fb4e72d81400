"""Scorers over parsed scenes: GenEval-style text-to-image checks, ImgEdit-style edit checks, and the OCR reward.

All checks compare the verifier's parse of an image with what the prompt or instruction
asks, under ShapeWorld v1's rules for generated images and edits (choices beyond them: docs/design.md, "ShapeWorld").
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
from rapidfuzz.distance import Levenshtein
from scipy.optimize import linear_sum_assignment

from ..shapeworld.edits import RESIZE_FACTORS, EditSpec, find_referent
from ..shapeworld.prompts import CATEGORIES, GENEVAL_CATEGORIES, ObjectSpec, Requirement, text_group_index
from ..shapeworld.render import shape_alpha, text_alpha
from ..shapeworld.world import Box, Scene, ShapeObject, default_text_color, region_holds, relation_holds, scale, size_class

POSITION_TOLERANCE = 3.0  # px at S = 64: an untouched object may move this much
SIZE_TOLERANCE = 0.25  # ...and change size by this fraction
RESIZE_TOLERANCE = 0.2  # a resized object's size within this fraction of source size x factor
CONSISTENT_PSNR = 30.0  # dB: the bar for a consistent edit
PSNR_CAP = 100.0  # dB reported for identical pixels (keeps JSON finite)
EDIT_BOX_DILATION = 2.0  # px at S = 64


# ----------------------------------------------------------------------------- OCR reward


def ocr_reward(read: str | None, target: str) -> float:
    """1 - Levenshtein(read, target) / len(target), 1.0 when the target is contained; case- and space-insensitive.

    >>> ocr_reward("CAT", "cat"), ocr_reward("CAR", "CAT"), ocr_reward(None, "CAT")
    (1.0, 0.6666666666666667, 0.0)
    """
    norm = lambda s: "".join((s or "").split()).upper()  # noqa: E731
    r, t = norm(read), norm(target)
    if not t:
        raise ValueError("the OCR target is empty")
    if t in r:
        return 1.0
    return max(0.0, 1.0 - Levenshtein.distance(r, t) / len(t))


# ----------------------------------------------------------------------------- text-to-image


@dataclass
class T2IResult:
    passed: bool  # strict GenEval-style pass
    partial: float  # fraction of atomic requirements met (RL partial credit)
    reasons: list[str] = field(default_factory=list)  # why it failed (empty when passed)
    ocr: float | None = None  # OCR reward when a word was asked
    precision: float = 1.0  # share of the parsed objects (and any unwanted text) that were asked for


def _matches(spec: ObjectSpec, obj: ShapeObject, canvas: int) -> bool:
    return (
        (spec.shape is None or obj.shape == spec.shape)
        and (spec.color is None or obj.color == spec.color)
        and (spec.size is None or size_class(obj.size, canvas) == spec.size)
    )


def _best_assignment(req: Requirement, scene: Scene) -> tuple[int, int, dict[int, list[Box]]]:
    """Assign parsed objects to the prompt's groups, maximising matched objects + relations that hold.

    Members of a group are interchangeable, so each group takes a combination of matching objects.
    Returns (objects matched, relations satisfied, boxes per group incl. the text group).
    """
    S = scene.canvas
    text_boxes = [scene.text.box] if scene.text is not None and req.word and scene.text.word == req.word else []
    best = (-1, -1, {})

    def relations_held(boxes: dict[int, list[Box]]) -> int:
        held = 0
        for r in req.relations:
            a, b = boxes.get(r.subject, []), boxes.get(r.object, [])
            expected_a = req.groups[r.subject].count if r.subject < len(req.groups) else 1
            expected_b = req.groups[r.object].count if r.object < len(req.groups) else 1
            if len(a) == expected_a and len(b) == expected_b and all(relation_holds(x, r.relation, y, S) for x in a for y in b):
                held += 1
        return held

    def search(g: int, used: frozenset[int], boxes: dict[int, list[Box]], matched: int) -> None:
        nonlocal best
        if g == len(req.groups):
            full = dict(boxes)
            full[text_group_index(req)] = text_boxes
            score = (matched + relations_held(full), matched)
            if score > (best[0] + best[1], best[0]):
                best = (matched, relations_held(full), full)
            return
        spec = req.groups[g]
        candidates = [i for i, o in enumerate(scene.objects) if i not in used and _matches(spec, o, S)]
        k = min(spec.count, len(candidates))
        for combo in itertools.combinations(candidates, k):
            boxes[g] = [scene.objects[i].box for i in combo]
            search(g + 1, used | set(combo), boxes, matched + k)
        boxes.pop(g, None)

    search(0, frozenset(), {}, 0)
    return best


def check_t2i(req: Requirement, scene: Scene) -> T2IResult:
    """Strict pass and partial credit of a parsed scene against a prompt's requirement."""
    reasons: list[str] = []
    n_slots = req.n_objects
    matched, held, _ = _best_assignment(req, scene)
    if matched < n_slots:
        reasons.append(f"{n_slots - matched} of {n_slots} asked objects missing or wrong")
    if held < len(req.relations):
        reasons.append(f"{len(req.relations) - held} of {len(req.relations)} relations do not hold")
    extra = len(scene.objects) - matched
    unwanted_text = scene.text is not None and req.word is None
    if extra > 0:
        reasons.append(f"{extra} extra object(s)")
    if unwanted_text:
        reasons.append(f'unwanted text "{scene.text.word}"')
    bg_ok = req.background is None or scene.background == req.background
    if not bg_ok:
        reasons.append(f"background is {scene.background}, not {req.background}")
    ocr = None
    if req.word is not None:
        read = scene.text.word if scene.text else None
        ocr = ocr_reward(read, req.word)
        if read != req.word:
            reasons.append(f'word reads {read!r}, not "{req.word}"')
        elif req.word_color and scene.text.color != req.word_color:
            reasons.append(f"word is {scene.text.color}, not {req.word_color}")
    earned = matched + held + float(extra <= 0 and not unwanted_text)
    possible = n_slots + len(req.relations) + 1
    if req.background is not None:
        earned, possible = earned + bg_ok, possible + 1
    if req.word is not None:
        earned, possible = earned + ocr, possible + 1
    drawn = len(scene.objects) + unwanted_text
    precision = matched / drawn if drawn else float(n_slots == 0)  # an empty canvas is precise only when nothing was asked
    return T2IResult(passed=not reasons, partial=earned / possible, reasons=reasons, ocr=ocr, precision=precision)


# ----------------------------------------------------------------------------- editing


@dataclass
class EditResult:
    passed: bool
    psnr: float | None  # consistency outside the edited boxes, dB (capped at PSNR_CAP)
    reasons: list[str] = field(default_factory=list)
    partial: float = 0.0  # fraction of the edit's atomic requirements met (the RL partial credit)

    @property
    def consistent(self) -> bool | None:
        """PSNR >= 30 dB; None when nothing outside the edit is left to compare."""
        return None if self.psnr is None else self.psnr >= CONSISTENT_PSNR


@dataclass(frozen=True)
class _Expected:
    """One object the output must hold: its (shape, color) and a test of where/how big it is."""

    shape: str
    color: str
    test: Callable[[ShapeObject], bool]
    what: str


def _near(src: ShapeObject, canvas: int, size_factor: float = 1.0, size_tol: float = SIZE_TOLERANCE) -> Callable[[ShapeObject], bool]:
    tol = POSITION_TOLERANCE * scale(canvas)
    want = src.size * size_factor
    return lambda o: math.hypot(o.cx - src.cx, o.cy - src.cy) <= tol and abs(o.size - want) <= size_tol * want


def _expected_objects(source: Scene, spec: EditSpec, output: Scene) -> list[_Expected]:
    S = source.canvas
    edited = find_referent(source, spec.color, spec.shape) if spec.color and spec.shape else None
    out = [
        _Expected(o.shape, o.color, _near(o, S), f"untouched {o.color} {o.shape}")
        for i, o in enumerate(source.objects)
        if i != edited
    ]
    c = spec.category
    if c == "add":
        if spec.relation:
            anchor = source.objects[find_referent(source, spec.anchor_color, spec.anchor_shape)]
            test = lambda o: relation_holds(o.box, spec.relation, anchor.box, S)  # noqa: E731
        else:
            test = lambda o: region_holds(o.box, spec.region, S)  # noqa: E731
        out.append(_Expected(spec.new_shape, spec.new_color, test, f"new {spec.new_color} {spec.new_shape}"))
    elif edited is not None and c != "remove":
        old = source.objects[edited]
        if c == "recolor":
            out.append(_Expected(old.shape, spec.new_color, _near(old, S), f"recolored {old.shape}"))
        elif c == "replace":
            out.append(_Expected(spec.new_shape, spec.new_color, _near(old, S), f"replacing {spec.new_color} {spec.new_shape}"))
        elif c == "resize":
            test = _near(old, S, RESIZE_FACTORS[spec.direction], RESIZE_TOLERANCE)
            out.append(_Expected(old.shape, old.color, test, f"{spec.direction} {old.color} {old.shape}"))
        elif c == "move":
            test = lambda o: region_holds(o.box, spec.region, S) and abs(o.size - old.size) <= SIZE_TOLERANCE * old.size  # noqa: E731
            out.append(_Expected(old.shape, old.color, test, f"moved {old.color} {old.shape}"))
    return out


def _assign(expected: Sequence[_Expected], objects: Sequence[ShapeObject]) -> list[int] | None:
    """A bijection expected -> output objects satisfying every expectation, or None."""
    if len(expected) != len(objects):
        return None

    def search(i: int, used: frozenset[int]) -> list[int] | None:
        if i == len(expected):
            return []
        e = expected[i]
        for j, o in enumerate(objects):
            if j not in used and o.shape == e.shape and o.color == e.color and e.test(o):
                rest = search(i + 1, used | {j})
                if rest is not None:
                    return [j] + rest
        return None

    return search(0, frozenset())


def _scene_reasons(source: Scene, spec: EditSpec, output: Scene) -> list[str]:
    """What is wrong with the output's background and word (at most one reason each)."""
    reasons = []
    want_bg = spec.background if spec.category == "background" else source.background
    if output.background != want_bg:
        reasons.append(f"background is {output.background}, not {want_bg}")
    want_word = spec.word if spec.category == "text" else (source.text.word if source.text else None)
    got_word = output.text.word if output.text else None
    if got_word != want_word:
        reasons.append(f"text reads {got_word!r}, not {want_word!r}")
    elif source.text is not None and output.text is not None:
        tol = POSITION_TOLERANCE * scale(source.canvas)
        if math.hypot(output.text.cx - source.text.cx, output.text.cy - source.text.cy) > tol:
            reasons.append("the text moved")
    return reasons


def _object_reasons(expected: Sequence[_Expected], assignment: list[int] | None, output: Scene) -> list[str]:
    if assignment is not None:
        return []
    want = sorted(f"{e.color} {e.shape}" for e in expected)
    got = sorted(f"{o.color} {o.shape}" for o in output.objects)
    if want != got:
        return [f"objects are [{', '.join(got)}], expected [{', '.join(want)}]"]
    return ["an object is out of place or the wrong size: " + "; ".join(e.what for e in expected)]


def _max_matched(expected: Sequence[_Expected], objects: Sequence[ShapeObject]) -> int:
    """How many expected objects a one-to-one matching can satisfy at most (a miss costs one, not all)."""
    if not expected or not objects:
        return 0
    fits = np.array([[o.shape == e.shape and o.color == e.color and e.test(o) for o in objects] for e in expected])
    rows, cols = linear_sum_assignment(fits, maximize=True)
    return int(fits[rows, cols].sum())


def edit_partial_credit(scene_reasons: Sequence[str], expected: Sequence[_Expected], output: Scene) -> float:
    """Fraction of an edit's atomic requirements met, as `check_t2i`'s partial credit: the background, the word,
    each object the output must hold, and one requirement per extra object (so drawing more never pays)."""
    matched = _max_matched(expected, output.objects)
    extras = len(output.objects) - matched
    return (2 - len(scene_reasons) + matched) / (2 + len(expected) + extras)


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float | None:
    if not mask.any():
        return None
    mse = float(((a.astype(np.float64) - b.astype(np.float64))[mask] ** 2).mean())
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


def _box_mask(boxes: Iterable[Box], canvas: int) -> np.ndarray:
    mask = np.zeros((canvas, canvas), bool)
    d = EDIT_BOX_DILATION * scale(canvas)
    for b in boxes:
        b = b.dilate(d)
        mask[max(int(math.floor(b.y0)), 0) : max(int(math.ceil(b.y1)), 0), max(int(math.floor(b.x0)), 0) : max(int(math.ceil(b.x1)), 0)] = True
    return mask


def _ink_mask(scene: Scene, with_text: bool) -> np.ndarray:
    """Pixels fully covered by the scene's objects (and text) — what a background edit must keep."""
    S = scene.canvas
    mask = np.zeros((S, S), bool)
    windows = [shape_alpha(o, S) for o in scene.objects] + ([text_alpha(scene.text, S)] if scene.text and with_text else [])
    for x0, y0, a in windows:
        mask[y0 : y0 + a.shape[0], x0 : x0 + a.shape[1]] |= a >= 0.999
    return mask


def consistency_mask(source: Scene, spec: EditSpec, output: Scene, assignment: list[int] | None, expected: list[_Expected], target: Scene | None = None) -> np.ndarray:
    """Where the output must equal the source: outside the edited objects' source, target and output boxes
    (dilated by 2 px); for a background edit, the pixels the objects cover (and the text, unless its default
    ink flips with the background); for keep, everywhere."""
    S = source.canvas
    if spec.category == "background":
        text_flips = source.text is not None and source.text.color == default_text_color(source.background)
        return _ink_mask(source, with_text=not text_flips)
    boxes: list[Box] = []
    if spec.category == "text":
        boxes += [t.box for t in (source.text, output.text, target.text if target else None) if t is not None]
    edited = find_referent(source, spec.color, spec.shape) if spec.color and spec.shape else None
    if edited is not None:
        boxes.append(source.objects[edited].box)
    n_untouched = len(source.objects) - (edited is not None)
    if assignment is not None:
        boxes += [output.objects[j].box for j in assignment[n_untouched:]]
    if target is not None:
        before = {(o.shape, o.color, o.cx, o.cy, o.size) for o in source.objects}
        boxes += [o.box for o in target.objects if (o.shape, o.color, o.cx, o.cy, o.size) not in before]
    return ~_box_mask(boxes, S)


def check_edit(
    source: Scene, spec: EditSpec, output: Scene, source_image: np.ndarray, output_image: np.ndarray, target: Scene | None = None
) -> EditResult:
    """Did the output (parsed as `output`) carry out `spec` on `source`, and how consistent is it elsewhere?"""
    scene_reasons = _scene_reasons(source, spec, output)
    expected = _expected_objects(source, spec, output)
    assignment = _assign(expected, output.objects)
    mask = consistency_mask(source, spec, output, assignment, expected, target)
    return EditResult(
        passed=not scene_reasons and assignment is not None,
        psnr=_psnr(source_image, output_image, mask),
        reasons=scene_reasons + _object_reasons(expected, assignment, output),
        partial=edit_partial_credit(scene_reasons, expected, output),
    )


# ----------------------------------------------------------------------------- summaries


def summarize_t2i(categories: Sequence[str], results: Sequence[T2IResult]) -> dict:
    """Pass rate per category; overall = mean of the six GenEval categories present; text and dense apart."""
    per: dict[str, list[T2IResult]] = {}
    for c, r in zip(categories, results):
        per.setdefault(c, []).append(r)
    table = {
        c: {
            "n": len(rs),
            "pass": float(np.mean([r.passed for r in rs])),
            "partial": float(np.mean([r.partial for r in rs])),
            **({"ocr": float(np.mean([r.ocr for r in rs]))} if any(r.ocr is not None for r in rs) else {}),
        }
        for c in CATEGORIES + tuple(sorted(set(per) - set(CATEGORIES)))
        if c in per
        for rs in [per[c]]
    }
    geneval = [table[c]["pass"] for c in GENEVAL_CATEGORIES if c in table]
    return {"categories": table, "overall": float(np.mean(geneval)) if geneval else None, "n": len(results)}


def summarize_edits(categories: Sequence[str], results: Sequence[EditResult]) -> dict:
    """Success per category and overall (mean over categories), mean PSNR, share of successes with PSNR >= 30 dB
    (among successes where a consistency region exists)."""
    per: dict[str, list[EditResult]] = {}
    for c, r in zip(categories, results):
        per.setdefault(c, []).append(r)

    def stats(rs: list[EditResult]) -> dict:
        psnrs = [r.psnr for r in rs if r.psnr is not None]
        wins = [r for r in rs if r.passed and r.consistent is not None]
        return {
            "n": len(rs),
            "success": float(np.mean([r.passed for r in rs])),
            "partial": float(np.mean([r.partial for r in rs])),
            "psnr": float(np.mean(psnrs)) if psnrs else None,
            "consistent_successes": float(np.mean([r.consistent for r in wins])) if wins else None,
        }

    table = {c: stats(rs) for c, rs in per.items()}
    overall = stats(list(results))
    overall["success"] = float(np.mean([t["success"] for t in table.values()])) if table else None
    return {"categories": table, "overall": overall, "n": len(results)}
