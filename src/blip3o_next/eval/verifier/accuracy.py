"""Per-field accuracy of the verifier against ground-truth scenes (used by tests and benchmarks)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import linear_sum_assignment

from ...shapeworld.degrade import DEGRADATIONS
from ...shapeworld.render import render
from ...shapeworld.sampler import sample_scene
from ...shapeworld.world import Scene, scale
from .parser import SceneParser

FIELDS = ("background", "count", "shape", "color", "center", "word")
CENTER_TOLERANCE = 1.5  # px at S = 64


@dataclass
class FieldCounts:
    correct: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0))
    total: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FIELDS, 0))

    def add(self, name: str, ok: bool) -> None:
        self.correct[name] += int(ok)
        self.total[name] += 1

    def accuracy(self) -> dict[str, float]:
        return {k: self.correct[k] / self.total[k] if self.total[k] else float("nan") for k in FIELDS}


def compare(truth: Scene, parsed: Scene, counts: FieldCounts) -> dict[int, int]:
    """Score one parse: background, object count and word per image; shape, color, center per true object.

    True objects are matched to parsed ones by center distance; an unmatched true object fails all three fields.
    Returns the matching (true object index -> parsed object index), for callers that score more fields.
    """
    counts.add("background", truth.background == parsed.background)
    counts.add("count", len(truth.objects) == len(parsed.objects))
    counts.add("word", (truth.text.word if truth.text else None) == (parsed.text.word if parsed.text else None))
    matched: dict[int, int] = {}
    if truth.objects and parsed.objects:
        cost = np.asarray([[np.hypot(t.cx - p.cx, t.cy - p.cy) for p in parsed.objects] for t in truth.objects])
        matched = dict(zip(*linear_sum_assignment(cost)))
    tol = CENTER_TOLERANCE * scale(truth.canvas)
    for i, t in enumerate(truth.objects):
        p = parsed.objects[matched[i]] if i in matched else None
        counts.add("shape", p is not None and p.shape == t.shape)
        counts.add("color", p is not None and p.color == t.color)
        counts.add("center", p is not None and float(np.hypot(t.cx - p.cx, t.cy - p.cy)) <= tol)
    return matched


def verifier_accuracy(
    n: int, canvas: int, degradations: tuple[str, ...] = tuple(DEGRADATIONS), seed: int = 0, parser: SceneParser | None = None
) -> dict[str, dict[str, float]]:
    """Accuracy per degradation and field on `n` random scenes rendered at `canvas`."""
    parser = parser or SceneParser()
    rng = np.random.default_rng(seed)
    scenes = [sample_scene(rng, canvas) for _ in range(n)]
    clean = np.stack([render(s) for s in scenes])
    out = {}
    for di, name in enumerate(degradations):
        drng = np.random.default_rng([seed, di])
        images = np.stack([DEGRADATIONS[name].apply(img, drng) for img in clean])
        counts = FieldCounts()
        for truth, parsed in zip(scenes, parser.parse_batch(images)):
            compare(truth, parsed, counts)
        out[name] = counts.accuracy()
    return out
