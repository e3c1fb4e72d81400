"""GRPO on the AR model with verifiable rewards, as the paper's RL stage: the AR model writes blueprints, the frozen
diffusion model renders them, reward functions score them, and only the AR parameters are updated.

One step:
    1. draw `prompts_per_step` training prompts from the data engine (never a prompt of the held-out evaluation
       suite) and sample `num_generations` blueprints for each with the current policy;
    2. render them with the frozen connector, diffusion transformer and VAE, and score them with the reward
       functions (`reward_funcs`, TRL's convention: named callables, mixed by `reward_weights`; rewards.py);
    3. advantages: each total reward minus its group's mean, over the group's standard deviation;
    4. loss per image token: -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A) + beta * KL(policy || reference),
       with the ratio to the policy that sampled the rollouts and the k3 KL estimator
       exp(ref - logp) - (ref - logp) - 1 (zero when policy equals reference); mean over tokens, then images.

A semantic-blueprint model can also be scored on its plans (rewards.py: `plan`, `plan_partial`): each blueprint
decoded to its scene and checked against the prompt. When no reward function reads images, step 2 renders nothing. Its
policy is the AR model and its image embedding (the input and output layer over image tokens), and the log-probs
are the embedding's exact hierarchy. `reader: true` freezes a copy of the starting AR side that re-reads each
blueprint for the renderer (`Blip3oNext.add_reader`), so the policy's updates never move the renderer's input;
`hidden_drift` logs how far the policy's own hidden states have moved.

`task: edit` runs the same loop on an edit model's edit AR model (a model with one AR model: that one): edit pairs
from the data engine (never one of the held-out ImgEdit suite), the frozen diffusion model renders each edit
blueprint with the reference image's latents, and the edit rewards score the outputs against the pair's source and
target (rewards.EDIT_REWARDS). A semantic edit model can be scored on its edit plans instead, again with no
diffusion. `task: mixed` puts text-to-image prompts and edit pairs in every step (`edit_fraction`) for a semantic
model whose one AR model does both, scored on their plans: what one task gains is not then undone by a run on the
other. The tasks (their training items, rendering and evaluation) are `grpo_tasks.py`'s; the settings are
`grpo_config.py`'s.

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
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..fileio import InputError, save_png, write_json
from ..models.autoregressive import SamplingConfig, forced_blueprint
from ..models.semantic_embedding import SemanticEmbedding
from ..models.text_tokenizer import ImageVocab
from .checkpoints import latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint
from .grpo_config import GRPOConfig
from .grpo_tasks import GRPOTask, Rollouts, make_task
from .metrics import MetricsLog
from .rewards import Completions, RewardFunction, as_reward_function, default_reward_funcs, weighted_rewards
from .stages import PretrainedModuleStage

logger = logging.getLogger(__name__)

# what a run writes beside its checkpoints and final/ (a recipe's stage with `docs_dir` copies them there)
RESULT_FILES = ("metrics.csv", "reward_curves.png", "kl_curve.png", "drift_curve.png", "eval_before.json", "eval_after.json", "before_after.md", "before_after.png", "timings.json")


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
        runs = [self._forced_hidden(vocab, input_ids[rows], attention_mask[rows], codes[rows]) for rows in prompt_runs(attention_mask)]
        hidden = torch.cat(runs)
        before = hidden[:, :-1]  # <S0>..c_{n-1} predict c_1..c_n
        if self.embedding is not None:
            positions = torch.arange(codes.shape[1], device=codes.device).expand_as(codes)
            return self.embedding.log_probs(before, codes, positions), hidden
        logits = self.ar.lm_head(before)[..., vocab.image_offset : vocab.vocab_end].float() / temperature
        return logits.log_softmax(-1).gather(-1, codes[..., None]).squeeze(-1), hidden

    def _forced_hidden(self, vocab: ImageVocab, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The hidden states over the blueprint of rows whose prompts are equally long, their padding cut off."""
        length = int(attention_mask.sum(1).max())
        return forced_blueprint(self.ar, vocab, input_ids[:, -length:], attention_mask[:, -length:], codes, self.embedding).hidden_states


def prompt_runs(attention_mask: torch.Tensor) -> list[slice]:
    """The runs of consecutive rows whose prompts hold the same number of tokens (a group's rollouts repeat one
    prompt). Each run is read apart with its left padding cut off, so a batch that mixes short text-to-image
    prompts with edits (instruction and reference blueprint, about 10x longer) pays for no padding."""
    lengths = attention_mask.sum(1).tolist()
    starts = [0, *(i for i in range(1, len(lengths)) if lengths[i] != lengths[i - 1]), len(lengths)]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


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


def sample_rollouts(pipe, task: GRPOTask, items: list, cfg: GRPOConfig, generator: torch.Generator, render: bool = True) -> Rollouts:
    """`num_generations` blueprints per prompt (or edit pair) from the current policy, rendered by the frozen
    diffusion model when `render` (some reward function reads images)."""
    repeated = [item for item in items for _ in range(cfg.num_generations)]
    sampling = SamplingConfig(temperature=cfg.temperature, top_k=0, top_p=1.0)
    if not render:
        ids, mask, codes = task.plans(pipe, repeated, sampling, generator)
        return Rollouts(repeated, ids, mask, codes.to(ids.device), None)
    noise = None
    if cfg.shared_noise:
        noise = torch.randn((len(items), *pipe.model.latent_shape), generator=generator).repeat_interleave(cfg.num_generations, 0)
    options = dict(generator=generator, sampling=sampling, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, latents=noise)
    out, ids, mask = task.render(pipe, repeated, **options)
    return Rollouts(repeated, ids, mask, out.blueprints.to(ids.device), [np.asarray(im) for im in out.images])


class PolicyStage(PretrainedModuleStage):
    """The whole model saved in checkpoints (only its AR part, or edit AR part, changes), so any checkpoint loads
    as a model."""

    def __init__(self, model):
        self.module = model


def train_grpo(cfg: GRPOConfig, reward_funcs: Sequence[RewardFunction | Callable[[Completions], Sequence[float]]] | None = None) -> Path:
    """Run (or resume) GRPO between evaluations on the held-out suite before and after it (`evaluate_before`,
    `evaluate_after`); returns the output folder, whose final/ holds the tuned model.

    `reward_funcs` (TRL's convention): the reward functions, each logged as `reward_<name>` and weighed by
    `cfg.reward_weights[name]` (1 for a name it does not hold); a plain callable is named after its `__name__` and
    read as reading images. Default: the task's built-in rewards (`rewards.default_reward_funcs`)."""
    from ..models.modeling import Blip3oNext
    from ..pipeline import Pipeline, resolve_model_path

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", dataclasses.asdict(cfg))
    torch.manual_seed(cfg.seed)
    model = Blip3oNext.from_pretrained(resolve_model_path(cfg.init_from), torch_dtype=torch.float32)
    task = make_task(cfg)
    funcs = [as_reward_function(f) for f in reward_funcs] if reward_funcs is not None else default_reward_funcs(cfg.task, cfg.reward_weights)
    check_model_fits(model, task, cfg, funcs)
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
    evaluate_before(task, cfg, out, timings)
    metrics = MetricsLog(out, enabled=True)
    bar = tqdm(total=cfg.steps, initial=step, desc="grpo")
    while step < cfg.steps:
        t0 = time.perf_counter()
        values = grpo_step(pipe, policy, reference, task, funcs, task.training.draw(step, cfg.prompts_per_step), optimizer, params, cfg, step)
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
            metrics.plot("reward_curves.png", [f"reward_{f.name}" for f in funcs] + ["reward"], log_scale=False, title="GRPO rewards (batch means)")
            metrics.plot("kl_curve.png", ["kl"], log_scale=False, title="KL(policy || reference) per token")
            metrics.plot("drift_curve.png", ["hidden_drift"], log_scale=False, title="||h - h_ref|| / ||h_ref|| over the sampled blueprints")
    bar.close()
    metrics.close()
    model.save_pretrained(out / "final")
    evaluate_after(task, cfg, out, step, timings)
    write_json(out / "timings.json", timings)
    return out


def evaluate_before(task: GRPOTask, cfg: GRPOConfig, out: Path, timings: dict[str, float]) -> None:
    """eval_before.json: the starting model on the held-out suite (once per run folder; `eval_per_category` 0 skips)."""
    from ..pipeline import Pipeline

    if cfg.eval_per_category and not (out / "eval_before.json").is_file():
        start = time.perf_counter()
        write_json(out / "eval_before.json", task.evaluate(Pipeline.from_pretrained(cfg.init_from, cfg.device), cfg))
        timings["eval_before_seconds"] = round(time.perf_counter() - start, 1)


def evaluate_after(task: GRPOTask, cfg: GRPOConfig, out: Path, step: int, timings: dict[str, float]) -> None:
    """eval_after.json: final/ on the held-out suite; before_after.md, the table of both evaluations; before_after.png,
    the same items before and after. A run extended by --steps evaluates again."""
    from ..pipeline import Pipeline

    if cfg.eval_per_category and _evaluated_step(out / "eval_after.json") != step:
        start = time.perf_counter()
        after_pipe = Pipeline.from_pretrained(out / "final", cfg.device)
        write_json(out / "eval_after.json", {**task.evaluate(after_pipe, cfg), "step": step})
        timings["eval_after_seconds"] = round(time.perf_counter() - start, 1)
        save_png(out / "before_after.png", task.grid(Pipeline.from_pretrained(cfg.init_from, cfg.device), after_pipe, cfg))
        before, after = (json.loads((out / f"eval_{k}.json").read_text()) for k in ("before", "after"))
        (out / "before_after.md").write_text(task.table(before, after) + "\n")


def check_model_fits(model, task: GRPOTask, cfg: GRPOConfig, reward_funcs: Sequence[RewardFunction]) -> None:
    """InputError naming what a run asks of its model that the model cannot give."""
    if not reward_funcs:
        raise InputError("GRPO needs at least one reward function")
    if task.edits and not model.config.editing:
        raise InputError(f"task {cfg.task} needs a model trained to edit (edit SFT); {cfg.init_from} is not")
    if cfg.task == "mixed" and not (model.semantic and model.edit_ar is None):
        raise InputError(f"task mixed trains one AR model that writes semantic blueprints for both tasks; {cfg.init_from} "
                         + ("has a separate edit AR model" if model.semantic else "writes VQ codes"))
    if model.semantic and cfg.temperature != 1.0:
        raise InputError(f"{cfg.init_from} writes semantic blueprints, whose exact log-probs are at temperature 1; got temperature {cfg.temperature}")
    if cfg.reader and model.edit_ar is not None:
        raise InputError(f"{cfg.init_from} has a separate edit AR model; a reader re-reads what `ar` writes, so set reader: false")
    images = [f.name for f in reward_funcs if f.reads == "images"]
    if cfg.task == "mixed" and images:
        raise InputError(f"task mixed scores plans alone, so its rewards read blueprints; {', '.join(images)} read images")
    plans = [f.name for f in reward_funcs if f.reads == "blueprints"]
    if not model.semantic and plans:
        raise InputError(f"{', '.join(plans)} read semantic blueprints; {cfg.init_from} writes VQ codes (set their weights to 0)")


def grpo_step(
    pipe, policy, reference, task: GRPOTask, reward_funcs: Sequence[RewardFunction], items: list, optimizer, params, cfg: GRPOConfig, step: int
) -> dict[str, float]:
    """Sample and score a group per prompt (or edit pair), then update the policy on them."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, 3, step]).generate_state(1)[0]))
    with torch.no_grad():
        rollouts = sample_rollouts(pipe, task, items, cfg, generator, render=any(f.reads == "images" for f in reward_funcs))
    rewards = weighted_rewards(reward_funcs, cfg.reward_weights, task.completions(rollouts))
    stats = policy_update(policy, reference, pipe.model.image_vocab, rollouts, rewards.total, optimizer, params, cfg)
    categories = np.array([task.label(item) for item in rollouts.items])
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
