"""GRPO's settings (`GRPOConfig`), as TRL's grpo_config.py: names follow TRL's where they mean the same
(num_generations, beta, epsilon)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..shapeworld.edits import EDIT_CATEGORIES
from ..shapeworld.prompts import CATEGORIES, COMPOSITION
from .config import RunConfig, redefault
from .rewards import DEFAULT_REWARD_WEIGHTS_BY_TASK, check_reward_weights


PROMPT_SOURCES = (*CATEGORIES, COMPOSITION)
TASKS = tuple(DEFAULT_REWARD_WEIGHTS_BY_TASK)  # t2i, edit, mixed


@dataclass
class GRPOConfig(RunConfig):
    """Settings of one GRPO run (YAML keys are these field names; unknown keys are rejected). The settings every trainer
    has are RunConfig's; GRPO's defaults of some of them differ."""

    stage: str = redefault("stage", "grpo", "always grpo (tells `blip3o train` which trainer reads this file)")
    output_dir: str = redefault("output_dir", "runs/grpo", "checkpoints, metrics.csv, curves, evaluations and final/ go here")
    init_from: str = redefault("init_from", "tiny", "the model to tune (a bundled name or a folder); also the frozen KL reference")
    steps: int = redefault("steps", 60, "optimizer steps (one batch of rollouts each)")
    lr: float = redefault("lr", 1e-5, "learning rate (official 5e-6 GenEval, 1e-6 text, for a 1.7B AR model)")
    warmup_steps: int = redefault("warmup_steps", 5, "linear warmup, then constant")
    weight_decay: float = redefault("weight_decay", 0.0)
    seed: int = redefault("seed", 0, "seeds the prompt draws and the rollouts")
    checkpoint_every: int = redefault("checkpoint_every", 10)

    task: str = field(
        default="t2i",
        metadata={"help": "t2i: text-to-image prompts and the AR model; edit: edit pairs and an edit model's edit AR model; mixed: both in "
                          "every step, on the one AR model of a semantic model that generates and edits, scored on their plans"},
    )
    edit_fraction: float = field(default=0.5, metadata={"help": "task mixed: share of each step's prompts that are edit pairs (the rest text to image)"})
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per step"})
    num_generations: int = field(default=16, metadata={"help": "blueprints sampled per prompt (the group; official 16)"})
    beta: float = field(default=0.001, metadata={"help": "KL coefficient to the frozen reference (official 0.001)"})
    epsilon: float = field(default=0.2, metadata={"help": "clip range of the importance ratio"})
    updates_per_batch: int = field(default=1, metadata={"help": "optimizer steps on each batch of rollouts (>1 makes the clipping bite)"})
    shared_noise: bool = field(default=True, metadata={"help": "the rollouts of one prompt start the diffusion from the same noise, so their rewards differ by blueprint"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature (no top-k/top-p, so log-probs are exact)"})
    num_inference_steps: int | None = field(default=None, metadata={"help": "diffusion steps of the rollouts (default: the model's)"})
    guidance_scale: float | None = field(default=None, metadata={"help": "CFG scale of the rollouts (default: the model's)"})
    reward_weights: dict[str, float] | None = field(
        default=None,
        metadata={"help": "weights of the built-in rewards: "
                          + "; ".join(f"{', '.join(w)} ({task})" for task, w in DEFAULT_REWARD_WEIGHTS_BY_TASK.items())
                          + "; unset ones keep their defaults (rewards.py)"},
    )
    category_weights: dict[str, float] | None = field(
        default=None,
        metadata={"help": f"text-to-image prompts (t2i, mixed): the mix over the categories and {COMPOSITION} (default: every one with prompts left, equally)"},
    )
    edit_category_weights: dict[str, float] | None = field(
        default=None, metadata={"help": "edit pairs (edit, mixed): the mix over the edit categories, keep included (default: all 9 equally)"}
    )
    heldout_per_category: int = field(default=50, metadata={"help": "the evaluation suite excluded from training: prompts (or edit pairs) per category"})
    heldout_suite_seed: int = field(default=0, metadata={"help": "... and its seed (the same as `blip3o eval geneval/imgedit --suite-seed`)"})
    eval_per_category: int = field(default=50, metadata={"help": "before/after GenEval (ImgEdit for edits) on the held-out suite (0 skips)"})
    eval_seed: int = field(default=0, metadata={"help": "generation seed of the before/after evaluation and grid"})
    device: str = field(default="cpu", metadata={"help": "torch device, e.g. cpu or cuda"})
    compile_transformer: bool = field(default=False, metadata={"help": "torch.compile the frozen diffusion transformer for the rollouts"})

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
        if not 0 < self.edit_fraction < 1:
            raise ValueError(f"edit_fraction must be in (0, 1), got {self.edit_fraction}")
        self.reward_weights = check_reward_weights(self.reward_weights or {}, DEFAULT_REWARD_WEIGHTS_BY_TASK[self.task])
        for name, sources, task in (("category_weights", PROMPT_SOURCES, "edit"), ("edit_category_weights", EDIT_CATEGORIES, "t2i")):
            weights = getattr(self, name) or {}
            if weights and self.task == task:
                raise ValueError(f"task {task} draws no {'text-to-image prompts' if task == 'edit' else 'edit pairs'}, so it takes no {name}")
            unknown = sorted(set(weights) - set(sources))
            if unknown:
                raise ValueError(f"{name}: unknown categories {', '.join(unknown)}; choose from {', '.join(sources)}")
        if self.task == "mixed" and 0 in self.prompts_per_task.values():
            raise ValueError(f"task mixed needs both kinds of prompt in every step; prompts_per_step {self.prompts_per_step} at "
                             f"edit_fraction {self.edit_fraction} gives {self.prompts_per_task}")

    @property
    def prompts_per_task(self) -> dict[str, int]:
        """How many of each step's `prompts_per_step` are text-to-image prompts and how many edit pairs."""
        edits = {"t2i": 0, "edit": self.prompts_per_step, "mixed": round(self.prompts_per_step * self.edit_fraction)}[self.task]
        return {"t2i": self.prompts_per_step - edits, "edit": edits}
