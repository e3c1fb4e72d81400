"""GRPO on the AR model with verifiable rewards (system.md item 10): the AR model writes blueprints, the frozen
diffusion model renders them, the verifier scores the images, and only the AR parameters are updated.

One step:
    1. draw `prompts_per_step` training prompts from the data engine (never a prompt of the held-out evaluation
       suite) and sample `num_generations` blueprints for each with the current policy;
    2. render them with the frozen connector, diffusion transformer and VAE, and score them (rewards.py);
    3. advantages: each reward minus its group's mean, over the group's standard deviation;
    4. loss per image token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL(policy || reference),
       with the ratio to the policy that sampled the rollouts and the k3 KL estimator
       exp(ref - logp) - (ref - logp) - 1 (zero when policy equals reference); mean over tokens, then images.

A semantic-blueprint model can also be scored on its plans (rewards.py: `plan`, `plan_partial`): each blueprint
decoded to its scene and checked against the prompt. With only plan rewards weighed, step 2 renders nothing. Its
policy is the AR model and its image embedding (the input and output layer over image tokens), and the log-probs
are the embedding's exact hierarchy. `reader: true` freezes a copy of the starting AR side that re-reads each
blueprint for the renderer (`Blip3oNext.add_reader`), so the policy's updates never move the renderer's input;
`hidden_drift` logs how far the policy's own hidden states have moved.

`task: edit` runs the same loop on an edit model's edit AR model (a model with one AR model: that one): edit pairs
from the data engine (never one of the held-out ImgEdit suite), the frozen diffusion model renders each edit
blueprint with the reference image's latents, and the edit rewards score the outputs against the pair's source and
target (rewards.EditReward). A semantic edit model can be scored on its edit plans instead, again with no diffusion.

Why not TRL's GRPOTrainer: it samples completions with `generate` over the whole vocabulary and hands the reward
functions decoded text. A rollout here must sample exactly n tokens inside the image codebook, and its reward
needs the policy's hidden states over those tokens (they condition the diffusion model) and a batched render of
the whole group. Expressing that in TRL means overriding its generation and scoring, which is most of the
trainer; the loop below is that part alone, with the same objective (GRPOConfig names follow TRL's where they
mean the same: num_generations, beta, epsilon).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..models.autoregressive import SamplingConfig, forced_blueprint
from ..fileio import InputError, save_png, write_json
from .rewards import (
    DEFAULT_EDIT_REWARD_WEIGHTS, DEFAULT_REWARD_WEIGHTS, EDIT_IMAGE_REWARD_NAMES, EDIT_REWARD_NAMES, IMAGE_REWARD_NAMES, REWARD_NAMES, EditReward,
    Rewards, VerifierReward, check_reward_weights, uses_images, uses_plans,
)
from ..models.semantic_embedding import SemanticEmbedding
from ..shapeworld.edits import EDIT_CATEGORIES, EditPair, edit_suite, sample_edit
from ..shapeworld.prompts import CATEGORIES, COMPOSITION, Prompt, canonical_prompt, canonical_suite, composition_prompt
from ..shapeworld.render import render as render_scene
from ..models.text_tokenizer import ImageVocab
from .trainer import MetricsLog, PretrainedModuleStage, config_from_yaml, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint

logger = logging.getLogger(__name__)

RESULT_FILES = ("metrics.csv", "reward_curves.png", "kl_curve.png", "drift_curve.png", "eval_before.json", "eval_after.json", "before_after.md", "before_after.png", "timings.json")
PROMPT_SOURCES = (*CATEGORIES, COMPOSITION)
TASKS = ("t2i", "edit")
PROBE_DRAWS = 2000  # canonical prompts drawn per category to find the categories with training prompts left


@dataclass
class GRPOConfig:
    """Settings of one GRPO run (YAML keys are these field names; unknown keys are rejected)."""

    stage: str = field(default="grpo", metadata={"help": "always grpo (tells `blip3o train` which trainer reads this file)"})
    task: str = field(default="t2i", metadata={"help": "t2i: text-to-image prompts and the AR model; edit: edit pairs and an edit model's edit AR model"})
    output_dir: str = field(default="runs/grpo", metadata={"help": "checkpoints, metrics.csv, curves, evaluations and final/ go here"})
    init_from: str = field(default="tiny", metadata={"help": "the model to tune (a bundled name or a folder); also the frozen KL reference"})
    steps: int = field(default=60, metadata={"help": "optimizer steps (one batch of rollouts each)"})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per step"})
    num_generations: int = field(default=16, metadata={"help": "blueprints sampled per prompt (the group; official 16)"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate (official 5e-6 GenEval, 1e-6 text, for a 1.7B AR model)"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warmup, then constant"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 disables)"})
    beta: float = field(default=0.001, metadata={"help": "KL coefficient to the frozen reference (official 0.001)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the importance ratio"})
    updates_per_batch: int = field(default=1, metadata={"help": "optimizer steps on each batch of rollouts (>1 makes the clipping bite)"})
    reader: bool = field(
        default=False,
        metadata={"help": "freeze a copy of the starting AR side as the reader that re-reads each blueprint for the renderer, so updates to the "
                          "policy never move the renderer's input (saved with the model; a model that has one keeps it)"},
    )
    shared_noise: bool = field(default=True, metadata={"help": "the rollouts of one prompt start the diffusion from the same noise, so their rewards differ by blueprint"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature (no top-k/top-p, so log-probs are exact)"})
    num_inference_steps: int | None = field(default=None, metadata={"help": "diffusion steps of the rollouts (default: the model's)"})
    guidance_scale: float | None = field(default=None, metadata={"help": "CFG scale of the rollouts (default: the model's)"})
    reward_weights: dict[str, float] | None = field(
        default=None, metadata={"help": f"weights of {', '.join(REWARD_NAMES)} (t2i) or {', '.join(EDIT_REWARD_NAMES)} (edit); unset ones keep their defaults"}
    )
    category_weights: dict[str, float] | None = field(
        default=None,
        metadata={"help": f"training mix over the categories and {COMPOSITION} (t2i) or the edit categories (default: every one with prompts left, equally)"},
    )
    heldout_per_category: int = field(default=50, metadata={"help": "the evaluation suite excluded from training: prompts (or edit pairs) per category"})
    heldout_suite_seed: int = field(default=0, metadata={"help": "... and its seed (the same as `blip3o eval geneval/imgedit --suite-seed`)"})
    eval_per_category: int = field(default=50, metadata={"help": "before/after GenEval (ImgEdit for edits) on the held-out suite (0 skips)"})
    eval_seed: int = field(default=0, metadata={"help": "generation seed of the before/after evaluation and grid"})
    seed: int = field(default=0, metadata={"help": "seeds the prompt draws and the rollouts"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    compile_transformer: bool = field(default=False, metadata={"help": "torch.compile the frozen diffusion transformer for the rollouts"})
    checkpoint_every: int = field(default=10, metadata={"help": "steps between checkpoints (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "older checkpoints are deleted"})
    export_to: str | None = field(default=None, metadata={"help": "also save the final model here in float16 (e.g. the bundled weights)"})
    docs_dir: str | None = field(default=None, metadata={"help": "copy the curves, metrics, evaluations, table and grid here"})

    def __post_init__(self):
        if self.stage != "grpo":
            raise ValueError(f"stage must be grpo, got {self.stage!r}")
        positive = ("steps", "prompts_per_step", "checkpoint_every", "updates_per_batch")
        if any(getattr(self, name) < 1 for name in positive):
            raise ValueError(f"{', '.join(positive)} must be >= 1")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be >= 2 (advantages compare rollouts of one prompt), got {self.num_generations}")
        if self.temperature <= 0 or self.lr <= 0 or self.beta < 0 or not 0 < self.epsilon < 1:
            raise ValueError("need temperature > 0, lr > 0, beta >= 0 and 0 < epsilon < 1")
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        edits = self.task == "edit"
        self.reward_weights = check_reward_weights(self.reward_weights or {}, DEFAULT_EDIT_REWARD_WEIGHTS if edits else DEFAULT_REWARD_WEIGHTS)
        sources = EDIT_CATEGORIES if edits else PROMPT_SOURCES
        unknown = sorted(set(self.category_weights or {}) - set(sources))
        if unknown:
            raise ValueError(f"unknown categories {', '.join(unknown)}; choose from {', '.join(sources)}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "GRPOConfig":
        return config_from_yaml(cls, path, **overrides)


# ----------------------------------------------------------------------------- prompts


def _category_mix(weights: dict[str, float], has_items) -> tuple[list[str], np.ndarray]:
    """The categories with a weight > 0 and items to train on, and their draw probabilities."""
    categories = [c for c, w in weights.items() if w > 0 and has_items(c)]
    if not categories:
        raise ValueError("no category has training items outside the held-out suite")
    w = np.array([weights[c] for c in categories], dtype=float)
    return categories, w / w.sum()


class TrainingPrompts:
    """Prompts from the data engine (the canonical categories and compositions), minus every prompt of the held-out
    evaluation suite.

    The suite holds every single-object, two-object, counting and colours prompt, so those categories get no
    training prompts; compositions (e.g. "two red circles and a square") train the same skills in combinations
    the suite does not ask for. Step k's prompts depend on (seed, k) alone, so a resumed run draws the same ones.
    """

    def __init__(self, cfg: GRPOConfig):
        self.heldout = {p.text for p in canonical_suite(cfg.heldout_per_category, seed=cfg.heldout_suite_seed)}
        self.seed = cfg.seed
        self.categories, self.probabilities = _category_mix(cfg.category_weights or {c: 1.0 for c in PROMPT_SOURCES}, self._has_training_prompts)

    @staticmethod
    def _prompt(category: str, rng: np.random.Generator) -> Prompt:
        return composition_prompt(rng) if category == COMPOSITION else canonical_prompt(category, rng)

    def _has_training_prompts(self, category: str) -> bool:
        rng = np.random.default_rng([self.seed, 99, PROMPT_SOURCES.index(category)])
        return any(self._prompt(category, rng).text not in self.heldout for _ in range(PROBE_DRAWS))

    def draw(self, step: int, n: int) -> list[Prompt]:
        rng = np.random.default_rng([self.seed, 7, step])
        prompts = []
        for category in rng.choice(self.categories, size=n, p=self.probabilities):
            prompt = self._prompt(str(category), rng)
            while prompt.text in self.heldout:
                prompt = self._prompt(str(category), rng)
            prompts.append(prompt)
        return prompts


def _edit_key(pair: EditPair) -> str:
    return json.dumps([pair.instruction, pair.source.to_dict()], sort_keys=True)


class TrainingEdits:
    """Edit pairs from the data engine (canonical instructions, as the ImgEdit suite's), minus every pair of the
    held-out suite. Random source scenes make a collision rare; it is checked anyway. Step k's pairs depend on
    (seed, k) alone."""

    def __init__(self, cfg: GRPOConfig):
        self.heldout = {_edit_key(p) for p in edit_suite(cfg.heldout_per_category, seed=cfg.heldout_suite_seed)}
        self.seed = cfg.seed
        self.categories, self.probabilities = _category_mix(cfg.category_weights or {c: 1.0 for c in EDIT_CATEGORIES}, lambda c: True)

    def draw(self, step: int, n: int) -> list[EditPair]:
        rng = np.random.default_rng([self.seed, 8, step])
        pairs = []
        for category in rng.choice(self.categories, size=n, p=self.probabilities):
            pair = sample_edit(str(category), rng)
            while _edit_key(pair) in self.heldout:
                pair = sample_edit(str(category), rng)
            pairs.append(pair)
        return pairs


# ----------------------------------------------------------------------------- objective


class Policy(torch.nn.Module):
    """What GRPO trains: the AR model (or an edit model's edit AR model) and, for a semantic blueprint, the image
    embedding, which is that AR model's input and output layer over image tokens."""

    def __init__(self, ar: torch.nn.Module, embedding: SemanticEmbedding | None):
        super().__init__()
        self.ar, self.embedding = ar, embedding

    def token_logprobs(
        self, vocab: ImageVocab, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probabilities (B, n) of the image codes after left-padded prompts, and the hidden states (B, n + 1, H)
        that condition the renderer. VQ codes are normalised over the image codebook (the sampler's support) at
        `temperature`; semantic ids get the embedding's exact hierarchy (`SemanticEmbedding.log_probs`, at
        temperature 1), without the sampler's constraint: the constraint removes only overlapping or overhanging
        shapes, and its normaliser would need every id's probability at every position."""
        hidden = forced_blueprint(self.ar, vocab, input_ids, attention_mask, codes, self.embedding).hidden_states
        before = hidden[:, :-1]  # <S0>..c_{n-1} predict c_1..c_n
        if self.embedding is not None:
            positions = torch.arange(codes.shape[1], device=codes.device).expand_as(codes)
            return self.embedding.log_probs(before, codes, positions), hidden
        logits = self.ar.lm_head(before)[..., vocab.image_offset : vocab.vocab_end].float() / temperature
        return logits.log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1), hidden


def hidden_drift(hidden: torch.Tensor, reference: torch.Tensor) -> float:
    """How far the policy's hidden states over a blueprint have moved from the reference model's on the same
    tokens: ||h - h_ref|| / ||h_ref||, over every position. The frozen renderer was trained on the reference's."""
    return ((hidden.float() - reference.float()).norm() / reference.float().norm().clamp_min(1e-12)).item()


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Each reward minus its group's mean over the group's standard deviation; a group of equal rewards gets 0."""
    groups = rewards.view(-1, group_size)
    advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + eps)
    return advantages.flatten()


def grpo_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor, epsilon: float, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO objective with a KL penalty; token tensors are (B, n), advantages (B,)."""
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
    policy_term = -torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon) * a)
    log_ratio_ref = ref_logp - logp
    kl = torch.exp(log_ratio_ref) - log_ratio_ref - 1
    loss = (policy_term + beta * kl).mean(1).mean()
    clipped = ((ratio - 1).abs() > epsilon).float().mean()
    return loss, {"kl": kl.mean().item(), "clip_fraction": clipped.item()}


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Rollouts:
    items: list  # one per rollout: the Prompt or EditPair (each repeated num_generations times)
    input_ids: torch.Tensor  # left-padded AR inputs
    attention_mask: torch.Tensor
    codes: torch.Tensor  # (N, n) sampled blueprints
    images: list[np.ndarray] | None  # None when no reward reads images (plan rewards only)


def sample_rollouts(pipe, task: "GRPOTask", items: list, cfg: GRPOConfig, generator: torch.Generator) -> Rollouts:
    """`num_generations` blueprints per prompt (or edit pair) from the current policy, rendered by the frozen
    diffusion model unless only plan rewards are weighed."""
    repeated = [item for item in items for _ in range(cfg.num_generations)]
    sampling = SamplingConfig(temperature=cfg.temperature, top_k=0, top_p=1.0)
    if not uses_images(cfg.reward_weights, task.image_reward_names):
        ids, mask, codes = task.plans(pipe, repeated, sampling, generator)
        return Rollouts(repeated, ids, mask, codes.to(ids.device), None)
    noise = None
    if cfg.shared_noise:
        noise = torch.randn((len(items), *pipe.model.latent_shape), generator=generator).repeat_interleave(cfg.num_generations, 0)
    options = dict(generator=generator, sampling=sampling, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, latents=noise)
    out, ids, mask = task.render(pipe, repeated, **options)
    return Rollouts(repeated, ids, mask, out.blueprints.to(ids.device), [np.asarray(im) for im in out.images])


# ----------------------------------------------------------------------------- tasks


def _change_row(name: str, n: int | str, before: float | None, after: float | None, digits: int = 3) -> str:
    if before is None or after is None:
        return f"| {name} | {n} | {before} | {after} | |"
    return f"| {name} | {n} | {before:.{digits}f} | {after:.{digits}f} | {after - before:+.{digits}f} |"


def _before_after_grid(cells: list, rows_before: list[dict], rows_after: list[dict], text: str, columns: int):
    """Cells captioned "pass -> fail: <prompt or instruction>" and framed by the result after RL."""
    from ..viz import image_grid

    verdict = lambda row: "pass" if row["passed"] else "fail"  # noqa: E731
    captions = [f"{verdict(b)} -> {verdict(a)}: {b[text]}" for b, a in zip(rows_before, rows_after)]
    return image_grid(cells, captions, [a["passed"] for a in rows_after], tile=128, columns=columns)


class TextToImage:
    """GRPO on text to image: data-engine prompts, the AR model, GenEval-style rewards and evaluation."""

    edits = False
    reward_names = REWARD_NAMES
    image_reward_names = IMAGE_REWARD_NAMES

    def __init__(self, cfg: GRPOConfig):
        self.training = TrainingPrompts(cfg)
        self.reward = VerifierReward(cfg.reward_weights)

    @staticmethod
    def render(pipe, prompts: list[Prompt], **options: Any):
        texts = [p.text for p in prompts]
        return pipe(texts, **options), *pipe.tokenize(texts)

    @staticmethod
    def plans(pipe, prompts: list[Prompt], sampling: SamplingConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The AR inputs and the blueprints sampled after them, nothing rendered."""
        ids, mask = pipe.tokenize([p.text for p in prompts])
        return ids, mask, pipe.written_blueprint(ids, mask, sampling, generator).codes

    def score(self, rollouts: Rollouts) -> Rewards:
        blueprints = rollouts.codes.cpu().numpy() if uses_plans(self.reward.weights) else None
        return self.reward([p.requirement for p in rollouts.items], rollouts.images, blueprints)

    @staticmethod
    def evaluate(pipe, cfg: GRPOConfig) -> dict:
        """GenEval-ShapeWorld on the held-out suite (the prompts training never sees), with the model's defaults;
        for a semantic-blueprint model also the plan score of the same blueprints (`plan`)."""
        from ..eval.suites import evaluate_t2i, generate_t2i_items, geneval_suite, plan_summary

        prompts, counts = geneval_suite(cfg.eval_per_category, seed=cfg.heldout_suite_seed)
        items = generate_t2i_items(pipe, prompts, counts, seed=cfg.eval_seed, progress=False)
        summary = evaluate_t2i(items)[1]
        return {**summary, "plan": plan_summary(items)} if pipe.model.semantic else summary

    @staticmethod
    def table(before: dict, after: dict) -> str:
        """Markdown table of strict pass (and OCR) per category, before and after RL; then the plan score's, if any."""
        lines = ["| category | n | before | after | change |", "|---|---|---|---|---|"]
        for cat, b in before["categories"].items():
            a = after["categories"][cat]
            lines.append(_change_row(cat, b["n"], b["pass"], a["pass"]))
            if "ocr" in b:
                lines.append(_change_row(f"{cat} (OCR reward)", b["n"], b["ocr"], a["ocr"]))
            lines.append(_change_row(f"{cat} (partial)", b["n"], b["partial"], a["partial"]))
        lines.append(_change_row("**overall** (six GenEval categories)", "", before["overall"], after["overall"]))
        if "plan" in before and "plan" in after:
            for cat, b in before["plan"]["categories"].items():
                lines.append(_change_row(f"plan score: {cat}", b["n"], b["pass"], after["plan"]["categories"][cat]["pass"]))
            lines.append(_change_row("**plan score overall**", "", before["plan"]["overall"], after["plan"]["overall"]))
        return "\n".join(lines)

    @staticmethod
    def grid(before_pipe, after_pipe, cfg: GRPOConfig, per_category: int = 2):
        """The same held-out prompts and seeds through the model before and after RL, side by side."""
        from ..eval.suites import evaluate_t2i, generate_t2i_items

        prompts = canonical_suite(per_category, seed=cfg.heldout_suite_seed)
        before, after = [generate_t2i_items(pipe, prompts, [1] * len(prompts), seed=cfg.eval_seed, progress=False) for pipe in (before_pipe, after_pipe)]
        rows_b, rows_a = evaluate_t2i(before)[0], evaluate_t2i(after)[0]
        return _before_after_grid([[b.images[0], a.images[0]] for b, a in zip(before, after)], rows_b, rows_a, "prompt", columns=4)


class Editing:
    """GRPO on editing: data-engine edit pairs, an edit model's edit AR model, edit rewards, ImgEdit evaluation."""

    edits = True
    reward_names = EDIT_REWARD_NAMES
    image_reward_names = EDIT_IMAGE_REWARD_NAMES

    def __init__(self, cfg: GRPOConfig):
        self.training = TrainingEdits(cfg)
        self.reward = EditReward(cfg.reward_weights)

    @staticmethod
    def render(pipe, pairs: list[EditPair], **options: Any):
        sources, instructions = [render_scene(p.source) for p in pairs], [p.instruction for p in pairs]
        inputs = pipe.edit_inputs(sources, instructions)
        return pipe.edit(sources, instructions, **options), inputs.input_ids, inputs.attention_mask

    @staticmethod
    def plans(pipe, pairs: list[EditPair], sampling: SamplingConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The AR inputs of the edits (instruction and the source's blueprint as the model reads it) and the edit
        blueprints sampled after them, nothing rendered."""
        inputs = pipe.edit_inputs([render_scene(p.source) for p in pairs], [p.instruction for p in pairs])
        ids, mask = inputs.input_ids, inputs.attention_mask
        return ids, mask, pipe.written_blueprint(ids, mask, sampling, generator, edits=True).codes

    def score(self, rollouts: Rollouts) -> Rewards:
        blueprints = rollouts.codes.cpu().numpy() if uses_plans(self.reward.weights) else None
        return self.reward(rollouts.items, rollouts.images, blueprints)

    @staticmethod
    def _items(pipe, cfg: GRPOConfig, per_category: int):
        from ..eval.suites import generate_edit_items

        return generate_edit_items(pipe, edit_suite(per_category, seed=cfg.heldout_suite_seed), seed=cfg.eval_seed, progress=False)

    def evaluate(self, pipe, cfg: GRPOConfig) -> dict:
        """ImgEdit-ShapeWorld on the held-out suite (edit pairs training never sees), with the model's defaults; for
        a semantic-blueprint model also the edit plan score of the same blueprints (`plan`)."""
        from ..eval.suites import edit_plan_summary, evaluate_edits

        items = self._items(pipe, cfg, cfg.eval_per_category)
        summary = evaluate_edits(items)[1]
        return {**summary, "plan": edit_plan_summary(items)} if pipe.model.semantic else summary

    @staticmethod
    def table(before: dict, after: dict) -> str:
        """Markdown table of edit success and partial credit per category, then PSNR and consistency."""
        lines = ["| category | n | before | after | change |", "|---|---|---|---|---|"]
        for cat, b in before["categories"].items():
            a = after["categories"][cat]
            lines.append(_change_row(cat, b["n"], b["success"], a["success"]))
            lines.append(_change_row(f"{cat} (partial)", b["n"], b["partial"], a["partial"]))
        b, a = before["overall"], after["overall"]
        lines.append(_change_row("**overall success** (mean of the categories)", b["n"], b["success"], a["success"]))
        lines.append(_change_row("mean consistency PSNR (dB)", b["n"], b["psnr"], a["psnr"], digits=1))
        lines.append(_change_row("successes at >= 30 dB", "", b["consistent_successes"], a["consistent_successes"]))
        if "plan" in before and "plan" in after:
            for cat, b in before["plan"]["categories"].items():
                lines.append(_change_row(f"plan score: {cat}", b["n"], b["success"], after["plan"]["categories"][cat]["success"]))
            lines.append(_change_row("**plan score overall**", "", before["plan"]["overall"]["success"], after["plan"]["overall"]["success"]))
        return "\n".join(lines)

    def grid(self, before_pipe, after_pipe, cfg: GRPOConfig, per_category: int = 2):
        """The same held-out edits and seeds before and after RL: source | before | after."""
        from ..eval.suites import evaluate_edits

        before, after = self._items(before_pipe, cfg, per_category), self._items(after_pipe, cfg, per_category)
        rows_b, rows_a = evaluate_edits(before)[0], evaluate_edits(after)[0]
        cells = [[b.source_image, b.output_image, a.output_image] for b, a in zip(before, after)]
        return _before_after_grid(cells, rows_b, rows_a, "instruction", columns=3)


GRPOTask = TextToImage | Editing


def make_task(cfg: GRPOConfig) -> GRPOTask:
    return Editing(cfg) if cfg.task == "edit" else TextToImage(cfg)


# ----------------------------------------------------------------------------- loop


class PolicyStage(PretrainedModuleStage):
    """The whole model saved in checkpoints (only its AR part, or edit AR part, changes), so any checkpoint loads
    as a model."""

    def __init__(self, model):
        self.module = model


def train_grpo(cfg: GRPOConfig) -> Path:
    """Run (or resume) GRPO, then evaluate before and after on the held-out suite; returns the output folder."""
    from ..models.modeling import Blip3oNext, export_model
    from ..pipeline import Pipeline, resolve_model_path

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dataclasses.asdict(cfg))
    torch.manual_seed(cfg.seed)
    model = Blip3oNext.from_pretrained(resolve_model_path(cfg.init_from), torch_dtype=torch.float32)
    task = make_task(cfg)
    if task.edits and not model.config.editing:
        raise InputError(f"task edit needs a model trained to edit (edit SFT); {cfg.init_from} is not")
    check_model_fits(model, cfg)
    if cfg.reader:
        model.add_reader()
    model.requires_grad_(False).eval()  # eval: no dropout, so the sampler and the loss see the same policy
    policy = Policy(model.ar_for(task.edits), model.image_embedding).requires_grad_(True)
    pipe = Pipeline(model, cfg.device, compile_transformer=cfg.compile_transformer)  # moves the model to the device
    reference = copy.deepcopy(policy).requires_grad_(False)
    logger.info("training categories: %s", ", ".join(task.training.categories))
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    stage = PolicyStage(model)
    step = 0
    resume = latest_checkpoint(out)
    if resume is not None:
        step, _ = load_checkpoint(resume, stage, optimizer, scheduler)
        logger.info("resumed from %s (step %d)", resume, step)
    timings = _read_timings(out)
    if cfg.eval_per_category and not (out / "eval_before.json").is_file():
        start = time.perf_counter()
        write_json(out / "eval_before.json", task.evaluate(Pipeline.from_pretrained(cfg.init_from, cfg.device), cfg))
        timings["eval_before_seconds"] = round(time.perf_counter() - start, 1)
    metrics = MetricsLog(out, enabled=True)
    bar = tqdm(total=cfg.steps, initial=step, desc="grpo")
    while step < cfg.steps:
        t0 = time.perf_counter()
        values = grpo_step(pipe, policy, reference, task, task.training.draw(step, cfg.prompts_per_step), optimizer, params, cfg, step)
        scheduler.step()
        step += 1
        values["seconds"] = time.perf_counter() - t0
        timings["rl_seconds"] = round(timings.get("rl_seconds", 0.0) + values["seconds"], 1)
        metrics.add(step, values)
        bar.update(1)
        bar.set_postfix(reward=f"{values['reward']:.3f}", kl=f"{values['kl']:.4f}")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            save_checkpoint(out, step, stage, model, optimizer, scheduler, step)
            prune_checkpoints(out, cfg.keep_checkpoints)
            write_json(out / "timings.json", timings)
            metrics.plot("reward_curves.png", [f"reward_{n}" for n in task.reward_names if f"reward_{n}" in values] + ["reward"], log_scale=False, title="GRPO rewards (batch means)")
            metrics.plot("kl_curve.png", ["kl"], log_scale=False, title="KL(policy || reference) per token")
            metrics.plot("drift_curve.png", ["hidden_drift"], log_scale=False, title="||h - h_ref|| / ||h_ref|| over the sampled blueprints")
    bar.close()
    metrics.close()
    model.save_pretrained(out / "final")
    if cfg.export_to:
        export_model(out / "final", cfg.export_to)
    if cfg.eval_per_category and _evaluated_step(out / "eval_after.json") != step:  # a run extended by --steps evaluates again
        start = time.perf_counter()
        after_pipe = Pipeline.from_pretrained(out / "final", cfg.device)
        write_json(out / "eval_after.json", {**task.evaluate(after_pipe, cfg), "step": step})
        timings["eval_after_seconds"] = round(time.perf_counter() - start, 1)
        save_png(out / "before_after.png", task.grid(Pipeline.from_pretrained(cfg.init_from, cfg.device), after_pipe, cfg))
        before, after = (json.loads((out / f"eval_{k}.json").read_text()) for k in ("before", "after"))
        (out / "before_after.md").write_text(task.table(before, after) + "\n")
    write_json(out / "timings.json", timings)
    if cfg.docs_dir:
        Path(cfg.docs_dir).mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            if (out / name).is_file():
                shutil.copyfile(out / name, Path(cfg.docs_dir) / name)
    return out


def check_model_fits(model, cfg: GRPOConfig) -> None:
    """InputError naming what a run asks of its model that the model cannot give."""
    if model.semantic and cfg.temperature != 1.0:
        raise InputError(f"{cfg.init_from} writes semantic blueprints, whose exact log-probs are at temperature 1; got temperature {cfg.temperature}")
    if cfg.reader and model.edit_ar is not None:
        raise InputError(f"{cfg.init_from} has a separate edit AR model; a reader re-reads what `ar` writes, so set reader: false")
    if not model.semantic and uses_plans(cfg.reward_weights):
        raise InputError(f"plan rewards read semantic blueprints; {cfg.init_from} writes VQ codes (set plan and plan_partial to 0)")


def grpo_step(pipe, policy, reference, task: GRPOTask, items: list, optimizer, params, cfg: GRPOConfig, step: int) -> dict[str, float]:
    """Sample and score a group per prompt (or edit pair), then update the policy on them."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 3, step]).generate_state(1)[0]))
    with torch.no_grad():
        rollouts = sample_rollouts(pipe, task, items, cfg, generator)
    rewards = task.score(rollouts)
    stats = policy_update(policy, reference, pipe.model.image_vocab, rollouts, rewards.total, optimizer, params, cfg)
    categories = np.array([item.category for item in rollouts.items])
    return {
        "reward": rewards.total.mean().item(),
        **{f"reward_{name}": value for name, value in rewards.means().items()},
        **{f"reward_{c}": rewards.total[torch.as_tensor(categories == c)].mean().item() for c in np.unique(categories)},
        "reward_std_in_group": rewards.total.view(-1, cfg.num_generations).std(1).mean().item(),
        **stats,
        "lr": optimizer.param_groups[0]["lr"],
    }


def policy_update(
    policy: Policy, reference: Policy, vocab: ImageVocab, rollouts: Rollouts, rewards: torch.Tensor, optimizer, params, cfg: GRPOConfig
) -> dict[str, float]:
    """`updates_per_batch` optimizer steps of the clipped objective on one batch of scored rollouts (groups of
    `num_generations` consecutive rollouts). Also reports `hidden_drift` of the sampling policy."""
    advantages = group_advantages(rewards.to(rollouts.codes.device), cfg.num_generations)
    inputs = (vocab, rollouts.input_ids, rollouts.attention_mask, rollouts.codes, cfg.temperature)
    with torch.no_grad():
        ref_logp, ref_hidden = reference.token_logprobs(*inputs)
    old_logp = None  # the sampling policy's log-probs: those of the first update, before any step
    for _ in range(cfg.updates_per_batch):
        logp, hidden = policy.token_logprobs(*inputs)
        if old_logp is None:
            old_logp, drift = logp.detach(), hidden_drift(hidden.detach(), ref_hidden)
        loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, cfg.epsilon, cfg.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
    return {"loss": loss.item(), "grad_norm": float(grad_norm), "hidden_drift": drift, **stats}


def _evaluated_step(path: Path) -> int | None:
    return json.loads(path.read_text()).get("step") if path.is_file() else None


def _read_timings(out: Path) -> dict[str, float]:
    path = out / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}

