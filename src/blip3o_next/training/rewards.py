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
Two more score the blueprint itself, for models that write semantic blueprints (weight 0 by default; they need no
diffusion rollout, so a run that weighs only them samples blueprints and renders nothing):
    plan          1 when the blueprint, decoded to its scene, passes the same check (semantic_blueprint.plan_score);
    plan_partial  the decoded scene's partial credit (which counts the word's OCR reward where one is asked).
The total is their weighted sum (ocr counted only where it applies).

Edits (GRPO on the edit AR model) have their own three, each in [0, 1], scored against the edit pair's source:
    success      1 when the verifier passes the edit (scorers.check_edit), else 0;
    partial      the fraction of the edit's atomic requirements met (background, word, each object the output
                 must hold, one per extra object);
    consistency  PSNR outside the edited boxes mapped linearly from 20 dB (0) to 40 dB (1); it does not apply
                 where nothing outside the edit is left to compare.
and, for semantic blueprints, the same check of the edit's plan (weight 0 by default; no diffusion rollout):
    plan          1 when the edit blueprint, decoded to its scene, carries out the edit on the pair's source;
    plan_partial  that check's partial credit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from ..eval.suites import parse_images
from ..eval.scorers import check_edit, check_t2i
from ..models.semantic_blueprint import decode_tokens, plan_score
from ..shapeworld.edits import EditPair
from ..shapeworld.prompts import Requirement
from ..shapeworld.render import render
from ..eval.verifier import SceneParser

IMAGE_REWARD_NAMES = ("strict", "partial", "ocr", "precision")
PLAN_REWARD_NAMES = ("plan", "plan_partial")
REWARD_NAMES = (*IMAGE_REWARD_NAMES, *PLAN_REWARD_NAMES)
DEFAULT_REWARD_WEIGHTS = {"strict": 1.0, "partial": 1.0, "ocr": 1.0, "precision": 0.0, "plan": 0.0, "plan_partial": 0.0}
EDIT_IMAGE_REWARD_NAMES = ("success", "partial", "consistency")
EDIT_REWARD_NAMES = (*EDIT_IMAGE_REWARD_NAMES, *PLAN_REWARD_NAMES)
DEFAULT_EDIT_REWARD_WEIGHTS = {"success": 1.0, "partial": 1.0, "consistency": 0.5, "plan": 0.0, "plan_partial": 0.0}
CONSISTENCY_PSNR_RANGE = (20.0, 40.0)  # dB mapped to a consistency reward of 0 and 1


@dataclass
class Rewards:
    total: torch.Tensor  # (N,) weighted sum, float32
    parts: dict[str, np.ndarray]  # each reward (N,); NaN where it does not apply (ocr without a word)

    def means(self) -> dict[str, float]:
        """Mean of each reward over the images it applies to (NaN when it applies to none)."""
        return {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for name, v in self.parts.items()}


def check_reward_weights(weights: Mapping[str, float], defaults: Mapping[str, float] = DEFAULT_REWARD_WEIGHTS) -> dict[str, float]:
    """The default weights updated by `weights`; a ValueError names an unknown reward or a negative weight."""
    unknown = sorted(set(weights) - set(defaults))
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)}; the rewards are {', '.join(defaults)}")
    merged = {**defaults, **{k: float(v) for k, v in weights.items()}}
    if any(w < 0 for w in merged.values()) or not any(w > 0 for w in merged.values()):
        raise ValueError(f"reward weights must be >= 0 with at least one > 0, got {merged}")
    return merged


def weighted_rewards(parts: dict[str, np.ndarray], weights: Mapping[str, float]) -> Rewards:
    """The weighted sum of the rewards, a NaN (does not apply) counting 0."""
    total = sum(weights[name] * np.nan_to_num(values, nan=0.0) for name, values in parts.items())
    return Rewards(total=torch.as_tensor(total, dtype=torch.float32), parts=parts)


def uses_images(weights: Mapping[str, float], names: Sequence[str] = IMAGE_REWARD_NAMES) -> bool:
    """Whether any reward that reads rendered images (`names`: those of text to image, or EDIT_IMAGE_REWARD_NAMES)
    has a weight; else rollouts need no diffusion."""
    return any(weights.get(name, 0.0) > 0 for name in names)


def uses_plans(weights: Mapping[str, float]) -> bool:
    """Whether any reward that reads semantic blueprints has a weight."""
    return any(weights.get(name, 0.0) > 0 for name in PLAN_REWARD_NAMES)


class VerifierReward:
    """`reward(requirements, images)` -> Rewards, one per image (images may differ in size); with `blueprints`
    (semantic blueprint ids, one row per image) the plan rewards too. Rewards with weight 0 whose inputs are not
    given are left out (`images=None` for plan-only rollouts)."""

    def __init__(self, weights: Mapping[str, float] | None = None, parser: SceneParser | None = None):
        self.weights = check_reward_weights(weights or {})
        self.parser = parser or SceneParser()

    def __call__(
        self, requirements: Sequence[Requirement], images: Sequence[np.ndarray] | None, blueprints: np.ndarray | None = None
    ) -> Rewards:
        parts: dict[str, np.ndarray] = {}
        if images is not None or uses_images(self.weights):
            parts |= self.image_parts(requirements, images if images is not None else [])
        if blueprints is not None or uses_plans(self.weights):
            parts |= plan_parts(requirements, blueprints if blueprints is not None else [])
        return weighted_rewards(parts, self.weights)

    def image_parts(self, requirements: Sequence[Requirement], images: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if len(requirements) != len(images):
            raise ValueError(f"{len(requirements)} requirements for {len(images)} images")
        results = [check_t2i(req, scene) for req, scene in zip(requirements, parse_images(list(images), self.parser))]
        return {
            "strict": np.array([float(r.passed) for r in results]),
            "partial": np.array([r.partial for r in results]),
            "ocr": np.array([np.nan if r.ocr is None else r.ocr for r in results]),
            "precision": np.array([r.precision for r in results]),
        }


def plan_parts(requirements: Sequence[Requirement], blueprints: Sequence) -> dict[str, np.ndarray]:
    """The plan rewards of semantic blueprints: each decoded to its scene and checked against its requirement."""
    if len(requirements) != len(blueprints):
        raise ValueError(f"{len(requirements)} requirements for {len(blueprints)} blueprints")
    results = [plan_score(ids, req) for req, ids in zip(requirements, blueprints)]
    return {"plan": np.array([float(r.passed) for r in results]), "plan_partial": np.array([r.partial for r in results])}


def consistency_reward(psnr: float | None) -> float:
    """PSNR mapped linearly onto [0, 1] over CONSISTENCY_PSNR_RANGE; NaN when there is nothing to compare."""
    if psnr is None:
        return float("nan")
    low, high = CONSISTENCY_PSNR_RANGE
    return float(np.clip((psnr - low) / (high - low), 0.0, 1.0))


class EditReward:
    """`reward(pairs, outputs)` -> Rewards, one per edit output: `pairs` are shapeworld.edits.EditPair (source
    scene, instruction, ground-truth target), `outputs` the edited images; with `blueprints` (semantic blueprint
    ids of the edits) the plan rewards too. As in VerifierReward, `outputs=None` serves plan-only rollouts."""

    def __init__(self, weights: Mapping[str, float] | None = None, parser: SceneParser | None = None):
        self.weights = check_reward_weights(weights or {}, DEFAULT_EDIT_REWARD_WEIGHTS)
        self.parser = parser or SceneParser()

    def __call__(self, pairs: Sequence[EditPair], outputs: Sequence[np.ndarray] | None, blueprints: np.ndarray | None = None) -> Rewards:
        parts: dict[str, np.ndarray] = {}
        if outputs is not None or uses_images(self.weights, EDIT_IMAGE_REWARD_NAMES):
            parts |= self.image_parts(pairs, outputs if outputs is not None else [])
        if blueprints is not None or uses_plans(self.weights):
            parts |= edit_plan_parts(pairs, blueprints if blueprints is not None else [])
        return weighted_rewards(parts, self.weights)

    def image_parts(self, pairs: Sequence[EditPair], outputs: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        if len(pairs) != len(outputs):
            raise ValueError(f"{len(pairs)} edit pairs for {len(outputs)} images")
        scenes = parse_images(list(outputs), self.parser)
        results = [check_edit(p.source, p.spec, scene, render(p.source), out, p.target) for p, scene, out in zip(pairs, scenes, outputs)]
        return {
            "success": np.array([float(r.passed) for r in results]),
            "partial": np.array([r.partial for r in results]),
            "consistency": np.array([consistency_reward(r.psnr) for r in results]),
        }


def edit_plan_parts(pairs: Sequence[EditPair], blueprints: Sequence) -> dict[str, np.ndarray]:
    """The plan rewards of edit blueprints: each decoded to its scene and checked (scorers.check_edit) as an output
    of its pair's edit, with no diffusion and no verifier in between."""
    if len(pairs) != len(blueprints):
        raise ValueError(f"{len(pairs)} edit pairs for {len(blueprints)} blueprints")
    plans = [decode_tokens(ids) for ids in blueprints]
    results = [check_edit(p.source, p.spec, plan, render(p.source), render(plan), p.target) for p, plan in zip(pairs, plans)]
    return {"plan": np.array([float(r.passed) for r in results]), "plan_partial": np.array([r.partial for r in results])}
