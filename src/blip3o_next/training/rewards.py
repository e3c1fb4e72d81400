"""Verifiable rewards for RL, as TRL's `reward_funcs`: a list of named callables, each scoring a batch of
completions (here: rollouts) with one value per completion, mixed by weights and logged under its own name.

A `RewardFunction` reads a `Completions` batch (the items, i.e. the requirement of each text-to-image prompt or each
edit pair, and what was generated for them: rendered images and/or semantic blueprints) and returns one value per
completion in [0, 1], NaN where it does not apply. `reads` says which the function needs: "images" (the rollouts
must be rendered by the frozen diffusion model) or "blueprints" (no diffusion at all). `Completions` parses each
image with the verifier once, however many functions read it.

Text to image (`T2I_REWARDS`):
    strict        1 when the image passes the GenEval-style check (every object, count, colour, relation and nothing
                  extra), else 0;
    partial       the fraction of the prompt's atomic requirements met (partial credit, a denser signal);
    ocr           for prompts that ask for a word: 1 - Levenshtein(read, word) / len(word), 1 when contained
                  (case- and space-insensitive); it does not apply to other prompts;
    precision     (weight 0 by default) the share of the drawn objects (and any unwanted word) that were asked for;
                  0 for an empty canvas when objects were asked. Partial credit charges all extras together one
                  requirement at most, so a policy can buy matched objects with extra ones; precision charges each
                  extra. (A penalty on extras alone, 1 / (1 + extras), was tried first: it paid for empty canvases,
                  and the policy learned them.)
    plan          (semantic blueprints, weight 0 by default) 1 when the blueprint, decoded to its scene, passes the
                  same check (semantic_blueprint.plan_score);
    plan_partial  the decoded scene's partial credit (which counts the word's OCR reward where one is asked).

Editing (`EDIT_REWARDS`), scored against the edit pair's source:
    success       1 when the verifier passes the edit (scorers.check_edit), else 0;
    partial       the fraction of the edit's atomic requirements met (background, word, each object the output
                  must hold, one per extra object);
    consistency   PSNR outside the edited boxes mapped linearly from 20 dB (0) to 40 dB (1); it does not apply
                  where nothing outside the edit is left to compare;
    plan, plan_partial  the same check of the edit blueprint decoded to its scene (no diffusion, no verifier).

Both at once (task mixed, `PLAN_REWARDS`): plan and plan_partial, each item checked as what it is (a text-to-image
prompt's blueprint against its prompt, an edit blueprint against its pair), so one function scores a batch of both.

The total is the weighted sum (a NaN counts 0). Any callable `f(completions) -> values` can join the list
(`as_reward_function` names it after `f.__name__` and assumes it reads images).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Literal, Mapping, Sequence

import numpy as np
import torch

from ..eval.scorers import EditResult, T2IResult, check_edit, check_t2i
from ..eval.suites import parse_images
from ..eval.verifier import SceneParser
from ..models.semantic_blueprint import decode_tokens, plan_score
from ..shapeworld.edits import EditPair
from ..shapeworld.prompts import Requirement
from ..shapeworld.render import render

DEFAULT_REWARD_WEIGHTS = {"strict": 1.0, "partial": 1.0, "ocr": 1.0, "precision": 0.0, "plan": 0.0, "plan_partial": 0.0}
DEFAULT_EDIT_REWARD_WEIGHTS = {"success": 1.0, "partial": 1.0, "consistency": 0.5, "plan": 0.0, "plan_partial": 0.0}
DEFAULT_MIXED_REWARD_WEIGHTS = {"plan": 1.0, "plan_partial": 1.0}
DEFAULT_REWARD_WEIGHTS_BY_TASK = {"t2i": DEFAULT_REWARD_WEIGHTS, "edit": DEFAULT_EDIT_REWARD_WEIGHTS, "mixed": DEFAULT_MIXED_REWARD_WEIGHTS}
CONSISTENCY_PSNR_RANGE = (20.0, 40.0)  # dB mapped to a consistency reward of 0 and 1


@dataclass
class Completions:
    """One batch of completions as reward functions read it: the items they answer (a text-to-image prompt's
    `Requirement`, or an `EditPair`), and what was generated for them. The verifier's and the plan checks run once per
    batch, on first use, whichever functions read them."""

    items: Sequence[Requirement | EditPair]
    images: Sequence[np.ndarray] | None = None  # rendered outputs (None: plan-only rollouts, nothing rendered)
    blueprints: np.ndarray | None = None  # semantic blueprint ids, one row per completion
    parser: SceneParser = field(default_factory=SceneParser, repr=False)

    def __post_init__(self):
        for name in ("images", "blueprints"):
            given = getattr(self, name)
            if given is not None and len(given) != len(self.items):
                raise ValueError(f"{len(self.items)} completions but {len(given)} {name}")

    def __len__(self) -> int:
        return len(self.items)

    def _given(self, name: str):
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"a reward function reads {name}, but this batch of {len(self)} completions has none")
        return value

    @cached_property
    def scenes(self) -> list:
        """Each image as the verifier parses it."""
        return parse_images(list(self._given("images")), self.parser)

    @cached_property
    def t2i_checks(self) -> list[T2IResult]:
        return [check_t2i(req, scene) for req, scene in zip(self.items, self.scenes)]

    @cached_property
    def plan_checks(self) -> list[T2IResult | EditResult]:
        """Each blueprint decoded to its scene and checked as what its item asks: a text-to-image prompt's scene, or
        the output of an edit pair's edit."""
        return [_edit_plan_check(item, ids) if isinstance(item, EditPair) else plan_score(ids, item)
                for item, ids in zip(self.items, self._given("blueprints"))]

    @cached_property
    def edit_checks(self) -> list[EditResult]:
        return [check_edit(p.source, p.spec, scene, render(p.source), out, p.target) for p, scene, out in zip(self.items, self.scenes, self.images)]


def _edit_plan_check(pair: EditPair, blueprint: np.ndarray) -> EditResult:
    """An edit blueprint decoded to its scene and checked as an output of the pair's edit."""
    plan = decode_tokens(blueprint)
    return check_edit(pair.source, pair.spec, plan, render(pair.source), render(plan), pair.target)


@dataclass(frozen=True)
class RewardFunction:
    """A named reward: `score(completions)` gives one value per completion (NaN where it does not apply)."""

    name: str
    score: Callable[[Completions], Sequence[float]]
    reads: Literal["images", "blueprints"] = "images"

    def __call__(self, completions: Completions) -> np.ndarray:
        values = np.asarray(self.score(completions), dtype=np.float64)
        if values.shape != (len(completions),):
            raise ValueError(f"reward {self.name} gave values of shape {values.shape} for {len(completions)} completions")
        return values


def as_reward_function(func: RewardFunction | Callable[[Completions], Sequence[float]]) -> RewardFunction:
    """A RewardFunction as it is, or a plain callable named after its `__name__`, reading images."""
    return func if isinstance(func, RewardFunction) else RewardFunction(func.__name__, func)


def _checked(checks: str, attribute: str) -> Callable[[Completions], np.ndarray]:
    """The reward that reads `attribute` of each result of one of Completions' check lists (None gives NaN)."""

    def score(completions: Completions) -> np.ndarray:
        return np.array([np.nan if (v := getattr(r, attribute)) is None else float(v) for r in getattr(completions, checks)])

    return score


def consistency_reward(psnr: float | None) -> float:
    """PSNR mapped linearly onto [0, 1] over CONSISTENCY_PSNR_RANGE; NaN when there is nothing to compare."""
    if psnr is None:
        return float("nan")
    low, high = CONSISTENCY_PSNR_RANGE
    return float(np.clip((psnr - low) / (high - low), 0.0, 1.0))


PLAN_REWARDS = (
    RewardFunction("plan", _checked("plan_checks", "passed"), reads="blueprints"),
    RewardFunction("plan_partial", _checked("plan_checks", "partial"), reads="blueprints"),
)
T2I_REWARDS = (
    RewardFunction("strict", _checked("t2i_checks", "passed")),
    RewardFunction("partial", _checked("t2i_checks", "partial")),
    RewardFunction("ocr", _checked("t2i_checks", "ocr")),
    RewardFunction("precision", _checked("t2i_checks", "precision")),
    *PLAN_REWARDS,
)
EDIT_REWARDS = (
    RewardFunction("success", _checked("edit_checks", "passed")),
    RewardFunction("partial", _checked("edit_checks", "partial")),
    RewardFunction("consistency", lambda completions: [consistency_reward(r.psnr) for r in completions.edit_checks]),
    *PLAN_REWARDS,
)
REWARDS_BY_TASK = {"t2i": T2I_REWARDS, "edit": EDIT_REWARDS, "mixed": PLAN_REWARDS}


def check_reward_weights(weights: Mapping[str, float], defaults: Mapping[str, float] = DEFAULT_REWARD_WEIGHTS) -> dict[str, float]:
    """The default weights updated by `weights`; a ValueError names an unknown reward or a negative weight."""
    unknown = sorted(set(weights) - set(defaults))
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)}; the rewards are {', '.join(defaults)}")
    merged = {**defaults, **{k: float(v) for k, v in weights.items()}}
    if any(w < 0 for w in merged.values()) or not any(w > 0 for w in merged.values()):
        raise ValueError(f"reward weights must be >= 0 with at least one > 0, got {merged}")
    return merged


def default_reward_funcs(task: str, weights: Mapping[str, float]) -> list[RewardFunction]:
    """The task's (t2i, edit or mixed) built-in rewards a run computes: every one reading what a weighed one makes the
    run produce (rendered images, or blueprints alone), weighed or not, so that the others are logged for free."""
    funcs = REWARDS_BY_TASK[task]
    reads = {f.reads for f in funcs if weights.get(f.name, 0.0) > 0}
    return [f for f in funcs if f.reads in reads]


@dataclass
class Rewards:
    total: torch.Tensor  # (N,) weighted sum, float32
    parts: dict[str, np.ndarray]  # each reward (N,); NaN where it does not apply (ocr without a word)

    def means(self) -> dict[str, float]:
        """Mean of each reward over the completions it applies to (NaN when it applies to none)."""
        return {name: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for name, v in self.parts.items()}


def weighted_rewards(reward_funcs: Sequence[RewardFunction], weights: Mapping[str, float], completions: Completions) -> Rewards:
    """Every function's values and their weighted sum (a NaN counts 0; a function `weights` does not name weighs 1)."""
    names = [f.name for f in reward_funcs]
    if len(set(names)) != len(names):
        raise ValueError(f"reward function names must be unique, got {names}")
    parts = {f.name: f(completions) for f in reward_funcs}
    total = sum((weights.get(name, 1.0) * np.nan_to_num(values, nan=0.0) for name, values in parts.items()), np.zeros(len(completions)))
    return Rewards(total=torch.as_tensor(total, dtype=torch.float32), parts=parts)
