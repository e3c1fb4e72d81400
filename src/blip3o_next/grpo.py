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

from .autoregressive import SamplingConfig, blueprint_hidden_states
from .fileio import save_png, write_json
from .rewards import DEFAULT_REWARD_WEIGHTS, REWARD_NAMES, VerifierReward, check_reward_weights
from .shapeworld.prompts import CATEGORIES, COMPOSITION, Prompt, canonical_prompt, canonical_suite, composition_prompt
from .text_tokenizer import ImageVocab
from .trainer import MetricsLog, PretrainedModuleStage, config_from_yaml, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint

logger = logging.getLogger(__name__)

RESULT_FILES = ("metrics.csv", "reward_curves.png", "kl_curve.png", "eval_before.json", "eval_after.json", "before_after.md", "before_after.png", "timings.json")
PROMPT_SOURCES = (*CATEGORIES, COMPOSITION)
PROBE_DRAWS = 2000  # canonical prompts drawn per category to find the categories with training prompts left


@dataclass
class GRPOConfig:
    """Settings of one GRPO run (YAML keys are these field names; unknown keys are rejected)."""

    stage: str = field(default="grpo", metadata={"help": "always grpo (tells `blip3o train` which trainer reads this file)"})
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
    shared_noise: bool = field(default=True, metadata={"help": "the rollouts of one prompt start the diffusion from the same noise, so their rewards differ by blueprint"})
    temperature: float = field(default=1.0, metadata={"help": "rollout sampling temperature (no top-k/top-p, so log-probs are exact)"})
    num_inference_steps: int | None = field(default=None, metadata={"help": "diffusion steps of the rollouts (default: the model's)"})
    guidance_scale: float | None = field(default=None, metadata={"help": "CFG scale of the rollouts (default: the model's)"})
    reward_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_REWARD_WEIGHTS), metadata={"help": f"weights of {', '.join(REWARD_NAMES)}"})
    category_weights: dict[str, float] | None = field(
        default=None, metadata={"help": f"training prompt mix over the categories and {COMPOSITION} (default: every one with prompts left, equally)"}
    )
    heldout_per_category: int = field(default=50, metadata={"help": "the evaluation suite excluded from training: prompts per category"})
    heldout_suite_seed: int = field(default=0, metadata={"help": "... and its seed (the same as `blip3o eval geneval --suite-seed`)"})
    eval_per_category: int = field(default=50, metadata={"help": "before/after GenEval on the held-out suite (0 skips)"})
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
        self.reward_weights = check_reward_weights(self.reward_weights)
        unknown = sorted(set(self.category_weights or {}) - set(PROMPT_SOURCES))
        if unknown:
            raise ValueError(f"unknown categories {', '.join(unknown)}; choose from {', '.join(PROMPT_SOURCES)}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "GRPOConfig":
        return config_from_yaml(cls, path, **overrides)


# ----------------------------------------------------------------------------- prompts


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
        weights = cfg.category_weights or {c: 1.0 for c in PROMPT_SOURCES}
        self.categories = [c for c, w in weights.items() if w > 0 and self._has_training_prompts(c)]
        if not self.categories:
            raise ValueError("no category has prompts outside the held-out suite")
        w = np.array([weights[c] for c in self.categories], dtype=float)
        self.probabilities = w / w.sum()

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


# ----------------------------------------------------------------------------- objective


def token_logprobs(ar, vocab: ImageVocab, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Log-probabilities (B, n) of the image codes after left-padded prompts under `ar`, over the image codebook
    only (the blueprint sampler's support), at `temperature`."""
    hidden = blueprint_hidden_states(ar, vocab, input_ids, attention_mask, codes)[:, :-1]  # <S0>..c_{n-1} predict c_1..c_n
    logits = ar.lm_head(hidden)[..., vocab.image_offset : vocab.vocab_end].float() / temperature
    return logits.log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1)


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
    prompts: list[Prompt]  # one per rollout (each prompt repeated num_generations times)
    input_ids: torch.Tensor  # left-padded prompts
    attention_mask: torch.Tensor
    codes: torch.Tensor  # (N, n) sampled blueprints
    images: list[np.ndarray]


def sample_rollouts(pipe, prompts: list[Prompt], cfg: GRPOConfig, generator: torch.Generator) -> Rollouts:
    """`num_generations` blueprints per prompt from the current policy, rendered by the frozen diffusion model."""
    repeated = [p for p in prompts for _ in range(cfg.num_generations)]
    texts = [p.text for p in repeated]
    sampling = SamplingConfig(temperature=cfg.temperature, top_k=0, top_p=1.0)
    noise = None
    if cfg.shared_noise:
        noise = torch.randn((len(prompts), *pipe.model.latent_shape), generator=generator).repeat_interleave(cfg.num_generations, 0)
    out = pipe(texts, generator=generator, sampling=sampling, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, latents=noise)
    ids, mask = pipe.tokenize(texts)
    return Rollouts(repeated, ids, mask, out.blueprints.to(ids.device), [np.asarray(im) for im in out.images])


# ----------------------------------------------------------------------------- evaluation


def evaluate_heldout(pipe, cfg: GRPOConfig) -> dict:
    """GenEval-ShapeWorld on the held-out suite (the prompts training never sees), with the model's defaults."""
    from .evaluation import evaluate_t2i, generate_t2i_items, geneval_suite

    prompts, counts = geneval_suite(cfg.eval_per_category, seed=cfg.heldout_suite_seed)
    items = generate_t2i_items(pipe, prompts, counts, seed=cfg.eval_seed, progress=False)
    _, summary = evaluate_t2i(items)
    return summary


def comparison_table(before: dict, after: dict) -> str:
    """Markdown table of strict pass (and OCR) per category, before and after RL."""
    lines = ["| category | n | before | after | change |", "|---|---|---|---|---|"]
    for cat, b in before["categories"].items():
        a = after["categories"][cat]
        lines.append(f"| {cat} | {b['n']} | {b['pass']:.3f} | {a['pass']:.3f} | {a['pass'] - b['pass']:+.3f} |")
        if "ocr" in b:
            lines.append(f"| {cat} (OCR reward) | {b['n']} | {b['ocr']:.3f} | {a['ocr']:.3f} | {a['ocr'] - b['ocr']:+.3f} |")
        lines.append(f"| {cat} (partial) | {b['n']} | {b['partial']:.3f} | {a['partial']:.3f} | {a['partial'] - b['partial']:+.3f} |")
    lines.append(f"| **overall** (six GenEval categories) | | {before['overall']:.3f} | {after['overall']:.3f} | {after['overall'] - before['overall']:+.3f} |")
    return "\n".join(lines)


def before_after_grid(before_pipe, after_pipe, cfg: GRPOConfig, path: Path, per_category: int = 2) -> None:
    """The same held-out prompts and seeds through the model before and after RL, side by side."""
    from .evaluation import evaluate_t2i, generate_t2i_items
    from .viz import image_grid

    prompts = canonical_suite(per_category, seed=cfg.heldout_suite_seed)
    pairs = []
    for pipe in (before_pipe, after_pipe):
        items = generate_t2i_items(pipe, prompts, [1] * len(prompts), seed=cfg.eval_seed, progress=False)
        pairs.append((items, evaluate_t2i(items)[0]))
    (before, rows_b), (after, rows_a) = pairs
    cells = [[b.images[0], a.images[0]] for b, a in zip(before, after)]
    captions = [f"{'pass' if rb['passed'] else 'fail'} -> {'pass' if ra['passed'] else 'fail'}: {rb['prompt']}" for rb, ra in zip(rows_b, rows_a)]
    save_png(path, image_grid(cells, captions, [ra["passed"] for ra in rows_a], tile=128, columns=4))


# ----------------------------------------------------------------------------- loop


class PolicyStage(PretrainedModuleStage):
    """The whole model saved in checkpoints (only its AR part changes), so any checkpoint loads as a model."""

    def __init__(self, model):
        self.module = model


def train_grpo(cfg: GRPOConfig) -> Path:
    """Run (or resume) GRPO, then evaluate before and after on the held-out suite; returns the output folder."""
    from .modeling import Blip3oNext
    from .pipeline import Pipeline, resolve_model_path
    from .trainer import export_model

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dataclasses.asdict(cfg))
    torch.manual_seed(cfg.seed)
    model = Blip3oNext.from_pretrained(resolve_model_path(cfg.init_from), torch_dtype=torch.float32)
    model.requires_grad_(False).eval()  # eval: no dropout, so the sampler and the loss see the same policy
    model.ar.requires_grad_(True)
    pipe = Pipeline(model, cfg.device, compile_transformer=cfg.compile_transformer)  # moves the model to the device
    reference = copy.deepcopy(model.ar).requires_grad_(False)
    prompts = TrainingPrompts(cfg)
    logger.info("training prompt categories: %s", ", ".join(prompts.categories))
    reward = VerifierReward(cfg.reward_weights)
    params = [p for p in model.ar.parameters() if p.requires_grad]
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
        write_json(out / "eval_before.json", evaluate_heldout(Pipeline.from_pretrained(cfg.init_from, cfg.device), cfg))
        timings["eval_before_seconds"] = round(time.perf_counter() - start, 1)
    metrics = MetricsLog(out, enabled=True)
    bar = tqdm(total=cfg.steps, initial=step, desc="grpo")
    while step < cfg.steps:
        t0 = time.perf_counter()
        values = grpo_step(pipe, reference, prompts.draw(step, cfg.prompts_per_step), reward, optimizer, params, cfg, step)
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
            metrics.plot("reward_curves.png", [f"reward_{n}" for n in REWARD_NAMES] + ["reward"], log_scale=False, title="GRPO rewards (batch means)")
            metrics.plot("kl_curve.png", ["kl"], log_scale=False, title="KL(policy || reference) per token")
    bar.close()
    metrics.close()
    model.save_pretrained(out / "final")
    if cfg.export_to:
        export_model(out / "final", cfg.export_to)
    if cfg.eval_per_category and _evaluated_step(out / "eval_after.json") != step:  # a run extended by --steps evaluates again
        start = time.perf_counter()
        after_pipe = Pipeline.from_pretrained(out / "final", cfg.device)
        write_json(out / "eval_after.json", {**evaluate_heldout(after_pipe, cfg), "step": step})
        timings["eval_after_seconds"] = round(time.perf_counter() - start, 1)
        before_after_grid(Pipeline.from_pretrained(cfg.init_from, cfg.device), after_pipe, cfg, out / "before_after.png")
        before, after = (json.loads((out / f"eval_{k}.json").read_text()) for k in ("before", "after"))
        (out / "before_after.md").write_text(comparison_table(before, after) + "\n")
    write_json(out / "timings.json", timings)
    if cfg.docs_dir:
        Path(cfg.docs_dir).mkdir(parents=True, exist_ok=True)
        for name in RESULT_FILES:
            if (out / name).is_file():
                shutil.copyfile(out / name, Path(cfg.docs_dir) / name)
    return out


def grpo_step(pipe, reference, prompts: list[Prompt], reward: VerifierReward, optimizer, params, cfg: GRPOConfig, step: int) -> dict[str, float]:
    """Sample and score a group per prompt, then update the policy on them."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 3, step]).generate_state(1)[0]))
    with torch.no_grad():
        rollouts = sample_rollouts(pipe, prompts, cfg, generator)
    rewards = reward([p.requirement for p in rollouts.prompts], rollouts.images)
    stats = policy_update(pipe.model.ar, reference, pipe.model.image_vocab, rollouts, rewards.total, optimizer, params, cfg)
    categories = np.array([p.category for p in rollouts.prompts])
    return {
        "reward": rewards.total.mean().item(),
        **{f"reward_{name}": value for name, value in rewards.means().items()},
        **{f"reward_{c}": rewards.total[torch.as_tensor(categories == c)].mean().item() for c in np.unique(categories)},
        "reward_std_in_group": rewards.total.view(-1, cfg.num_generations).std(1).mean().item(),
        **stats,
        "lr": optimizer.param_groups[0]["lr"],
    }


def policy_update(ar, reference, vocab: ImageVocab, rollouts: Rollouts, rewards: torch.Tensor, optimizer, params, cfg: GRPOConfig) -> dict[str, float]:
    """`updates_per_batch` optimizer steps of the clipped objective on one batch of scored rollouts (groups of
    `num_generations` consecutive rollouts)."""
    advantages = group_advantages(rewards.to(rollouts.codes.device), cfg.num_generations)
    inputs = (vocab, rollouts.input_ids, rollouts.attention_mask, rollouts.codes, cfg.temperature)
    with torch.no_grad():
        ref_logp = token_logprobs(reference, *inputs)
    old_logp = None  # the sampling policy's log-probs: those of the first update, before any step
    for _ in range(cfg.updates_per_batch):
        logp = token_logprobs(ar, *inputs)
        old_logp = logp.detach() if old_logp is None else old_logp
        loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, cfg.epsilon, cfg.beta)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        optimizer.step()
    return {"loss": loss.item(), "grad_norm": float(grad_norm), **stats}


def _evaluated_step(path: Path) -> int | None:
    return json.loads(path.read_text()).get("step") if path.is_file() else None


def _read_timings(out: Path) -> dict[str, float]:
    path = out / "timings.json"
    return json.loads(path.read_text()) if path.is_file() else {}

