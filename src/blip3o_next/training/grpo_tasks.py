"""GRPO's tasks: text to image, editing, and both at once (mixed). Each names where its training items come from
(data-engine prompts or edit pairs, never one of the held-out evaluation suite), how its rollouts are rendered or
planned, what reward functions read of them (`completions`; the functions themselves are rewards.py's, passed to the
trainer), and its evaluation before and after RL (GenEval or ImgEdit on the held-out suite, a markdown table, a grid of
the same items)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..eval.verifier import SceneParser
from ..models.autoregressive import SamplingConfig
from ..shapeworld.edits import EDIT_CATEGORIES, EditPair, edit_suite, sample_edit
from ..shapeworld.prompts import COMPOSITION, Prompt, canonical_prompt, canonical_suite, composition_prompt
from ..shapeworld.render import render as render_scene
from .grpo_config import PROMPT_SOURCES, GRPOConfig
from .rewards import Completions

PROBE_DRAWS = 2000  # canonical prompts drawn per category to find the categories with training prompts left


@dataclass
class Rollouts:
    """A step's sampled blueprints, with the AR inputs they followed and (when a reward reads them) their images."""

    items: list  # one per rollout: the Prompt or EditPair (each repeated num_generations times)
    input_ids: torch.Tensor  # left-padded AR inputs
    attention_mask: torch.Tensor
    codes: torch.Tensor  # (N, n) sampled blueprints
    images: list[np.ndarray] | None  # None when no reward reads images (plan rewards only)


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
        self.categories, self.probabilities = _category_mix(cfg.edit_category_weights or {c: 1.0 for c in EDIT_CATEGORIES}, lambda c: True)

    def draw(self, step: int, n: int) -> list[EditPair]:
        rng = np.random.default_rng([self.seed, 8, step])
        pairs = []
        for category in rng.choice(self.categories, size=n, p=self.probabilities):
            pair = sample_edit(str(category), rng)
            while _edit_key(pair) in self.heldout:
                pair = sample_edit(str(category), rng)
            pairs.append(pair)
        return pairs


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
    """GRPO on text to image: data-engine prompts, the AR model, GenEval-style evaluation."""

    edits = False

    def __init__(self, cfg: GRPOConfig):
        self.training = TrainingPrompts(cfg)
        self.parser = SceneParser()

    @staticmethod
    def render(pipe, prompts: list[Prompt], **options: Any):
        texts = [p.text for p in prompts]
        return pipe(texts, **options), *pipe.tokenize(texts)

    @staticmethod
    def plans(pipe, prompts: list[Prompt], sampling: SamplingConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The AR inputs and the blueprints sampled after them, nothing rendered."""
        ids, mask = pipe.tokenize([p.text for p in prompts])
        return ids, mask, pipe.written_blueprint(ids, mask, sampling, generator).codes

    @staticmethod
    def label(prompt: Prompt) -> str:
        """The category a rollout's reward is logged under."""
        return prompt.category

    def completions(self, rollouts: Rollouts) -> Completions:
        """What the reward functions score: each prompt's requirement, its image (if rendered) and its blueprint."""
        return Completions([p.requirement for p in rollouts.items], rollouts.images, rollouts.codes.cpu().numpy(), self.parser)

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
    """GRPO on editing: data-engine edit pairs, an edit model's edit AR model, ImgEdit evaluation."""

    edits = True

    def __init__(self, cfg: GRPOConfig):
        self.training = TrainingEdits(cfg)
        self.parser = SceneParser()

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

    @staticmethod
    def label(pair: EditPair) -> str:
        """The category a rollout's reward is logged under."""
        return pair.category

    def completions(self, rollouts: Rollouts) -> Completions:
        """What the reward functions score: each edit pair, its output (if rendered) and its edit blueprint."""
        return Completions(rollouts.items, rollouts.images, rollouts.codes.cpu().numpy(), self.parser)

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


class MixedItems:
    """Each step's text-to-image prompts and edit pairs (`GRPOConfig.prompts_per_task`), each drawn as its own task
    draws them."""

    def __init__(self, cfg: GRPOConfig):
        self.prompts, self.edits = TrainingPrompts(cfg), TrainingEdits(cfg)
        self.counts = cfg.prompts_per_task
        self.categories = [*self.prompts.categories, *(f"edit_{c}" for c in self.edits.categories)]

    def draw(self, step: int, n: int) -> list[Prompt | EditPair]:
        if n != sum(self.counts.values()):
            raise ValueError(f"{n} prompts asked of a step of {self.counts}")
        return [*self.prompts.draw(step, self.counts["t2i"]), *self.edits.draw(step, self.counts["edit"])]


def _left_padded(rows: list[tuple[torch.Tensor, torch.Tensor]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded AR inputs and masks of several batches stacked into one, padded on the left to the longest."""
    length = max(ids.shape[1] for ids, _ in rows)
    pad = lambda t, value: torch.nn.functional.pad(t, (length - t.shape[1], 0), value=value)  # noqa: E731
    return torch.cat([pad(ids, pad_id) for ids, _ in rows]), torch.cat([pad(mask, 0) for _, mask in rows])


class Mixed:
    """GRPO on text to image and editing at once, for a semantic model whose one AR model both generates and edits:
    every step holds prompts of both, each group scored by the plan rewards as what it is (rewards.PLAN_REWARDS), so
    neither task's gains are paid for by the other's, as they are when a run on one follows a run on the other. The
    evaluation is both GenEval and ImgEdit on their held-out suites."""

    edits = True  # the model must edit

    def __init__(self, cfg: GRPOConfig):
        self.t2i, self.editing = TextToImage(cfg), Editing(cfg)
        self.training = MixedItems(cfg)

    @staticmethod
    def render(pipe, items: list, **options: Any):
        raise ValueError("task mixed scores plans alone; set the weights of rewards that read images to 0")

    def plans(self, pipe, items: list, sampling: SamplingConfig, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompts' and the edits' blueprints, each sampled as its task samples them (apart, so that no prompt is
        padded to an edit's length), and their AR inputs in one left-padded batch, in the items' order."""
        is_edit = [isinstance(item, EditPair) for item in items]
        if is_edit != sorted(is_edit):
            raise ValueError("a mixed batch lists its text-to-image prompts first, then its edit pairs")
        split = is_edit.count(False)
        parts = [task.plans(pipe, part, sampling, generator) for task, part in ((self.t2i, items[:split]), (self.editing, items[split:])) if part]
        ids, mask = _left_padded([(ids, mask) for ids, mask, _ in parts], pipe.model.tokenizer.pad_token_id)
        return ids, mask, torch.cat([codes for _, _, codes in parts])

    @staticmethod
    def label(item: Prompt | EditPair) -> str:
        """The category a rollout's reward is logged under; edits' carry `edit_` (both have a text category)."""
        return f"edit_{item.category}" if isinstance(item, EditPair) else item.category

    def completions(self, rollouts: Rollouts) -> Completions:
        """Each item (a prompt's requirement or an edit pair) and its blueprint; nothing is rendered."""
        items = [item if isinstance(item, EditPair) else item.requirement for item in rollouts.items]
        return Completions(items, None, rollouts.codes.cpu().numpy(), self.t2i.parser)

    def evaluate(self, pipe, cfg: GRPOConfig) -> dict:
        """GenEval and ImgEdit on their held-out suites (`eval_per_category` prompts, and edit pairs, per category)."""
        return {"geneval": self.t2i.evaluate(pipe, cfg), "imgedit": self.editing.evaluate(pipe, cfg)}

    def table(self, before: dict, after: dict) -> str:
        return "\n\n".join([f"Text to image (GenEval):\n\n{self.t2i.table(before['geneval'], after['geneval'])}",
                             f"Editing (ImgEdit):\n\n{self.editing.table(before['imgedit'], after['imgedit'])}"])

    def grid(self, before_pipe, after_pipe, cfg: GRPOConfig):
        """The text-to-image grid above the edit grid."""
        from ..viz import stack_vertically

        return stack_vertically([self.t2i.grid(before_pipe, after_pipe, cfg), self.editing.grid(before_pipe, after_pipe, cfg)])


GRPOTask = TextToImage | Editing | Mixed


def make_task(cfg: GRPOConfig) -> GRPOTask:
    return {"t2i": TextToImage, "edit": Editing, "mixed": Mixed}[cfg.task](cfg)
