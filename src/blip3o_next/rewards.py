"""Verifiable rewards for RL (system.md item 10): the verifier parses each rendered image and scores it against
the prompt it was generated for.

Three rewards, each in [0, 1]:
    strict   1 when the image passes the GenEval-style check (every object, count, colour, relation and nothing
             extra), else 0;
    partial  the fraction of the prompt's atomic requirements met (partial credit, a denser signal);
    ocr      for prompts that ask for a word: 1 - Levenshtein(read, word) / len(word), 1 when contained
             (case- and space-insensitive); it does not apply to other prompts.
and an optional fourth (weight 0 by default):
    precision the share of the drawn objects (and any unwanted word) that were asked for; 0 for an empty canvas
             when objects were asked. Partial credit charges all extras together one requirement at most, so a
             policy can buy matched objects with extra ones; precision charges each extra. (A penalty on extras
             alone, 1 / (1 + extras), was tried first: it paid for empty canvases, and the policy learned them.)
The total is their weighted sum (ocr counted only where it applies).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from .evaluation import parse_images
from .scorers import check_t2i
from .shapeworld.prompts import Requirement
from .verifier import SceneParser

REWARD_NAMES = ("strict", "partial", "ocr", "precision")
DEFAULT_REWARD_WEIGHTS = {"strict": 1.0, "partial": 1.0, "ocr": 1.0, "precision": 0.0}


@dataclass
class Rewards:
    total: torch.Tensor  # (N,) weighted sum, float32
    parts: dict[str, np.ndarray]  # each reward (N,); NaN where it does not apply (ocr without a word)

    def means(self) -> dict[str, float]:
        """Mean of each reward over the images it applies to (NaN when it applies to none)."""
        return {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for name, v in self.parts.items()}


def check_reward_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """The default weights updated by `weights`; a ValueError names an unknown reward or a negative weight."""
    unknown = sorted(set(weights) - set(REWARD_NAMES))
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)}; the rewards are {', '.join(REWARD_NAMES)}")
    merged = {**DEFAULT_REWARD_WEIGHTS, **{k: float(v) for k, v in weights.items()}}
    if any(w < 0 for w in merged.values()) or not any(w > 0 for w in merged.values()):
        raise ValueError(f"reward weights must be >= 0 with at least one > 0, got {merged}")
    return merged


class VerifierReward:
    """`reward(requirements, images)` -> Rewards, one per image (images may differ in size)."""

    def __init__(self, weights: Mapping[str, float] | None = None, parser: SceneParser | None = None):
        self.weights = check_reward_weights(weights or {})
        self.parser = parser or SceneParser()

    def __call__(self, requirements: Sequence[Requirement], images: Sequence[np.ndarray]) -> Rewards:
        if len(requirements) != len(images):
            raise ValueError(f"{len(requirements)} requirements for {len(images)} images")
        results = [check_t2i(req, scene) for req, scene in zip(requirements, parse_images(list(images), self.parser))]
        parts = {
            "strict": np.array([float(r.passed) for r in results]),
            "partial": np.array([r.partial for r in results]),
            "ocr": np.array([np.nan if r.ocr is None else r.ocr for r in results]),
            "precision": np.array([r.precision for r in results]),
        }
        total = sum(self.weights[name] * np.nan_to_num(values, nan=0.0) for name, values in parts.items())
        return Rewards(total=torch.as_tensor(total, dtype=torch.float32), parts=parts)
