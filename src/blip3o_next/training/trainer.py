"""Training on accelerate: one loop for every stage (image tokenizer, VAE, pretrain, SFT), configured by YAML.

Reads like nanoGPT's train.py: settings, data, model, optimizer, then the loop. Runs unchanged under
`accelerate launch` or `torchrun` (DDP; with `fsdp: true` FSDP, `fsdp.py`; gloo on CPU). The data is one global
stream indexed by sample position (the data engine's, or with `data:` your own shards', `own_data.py`): every step
takes the next `batch_size` samples and each process its contiguous slice, so a run with N processes sees exactly the
batches of a single-process run.

The settings are `config.py`'s, the stages `stages.py`'s, the data stream `data.py`'s, the checkpoints
`checkpoints.py`'s (under FSDP one shard file per process; `final/` is the whole model as without it) and the
metrics log `metrics.py`'s.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import latest_checkpoint, load_checkpoint, load_sharded_checkpoint, prune_checkpoints, save_checkpoint, save_sharded_checkpoint
from .config import TrainConfig
from .data import open_own_data, process_batch, sample_generators
from .fsdp import gather_full_model, meta_copy, shard_model
from .metrics import MetricsLog
from .stages import ModelStage, Stage, make_stage

if TYPE_CHECKING:
    from .own_data import OwnData

logger = logging.getLogger(__name__)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def train(cfg: TrainConfig, stop_after: int | None = None) -> Path:
    """Run (or resume) a training stage; returns the output folder. `stop_after` ends this run early (tests)."""
    # A recipe runs stages with different mixed precision in one process; accelerate keeps that setting in a
    # process-wide singleton, so drop it (the distributed PartialState, if any, is kept).
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=cfg.mixed_precision)
    if cfg.batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {accelerator.num_processes} processes")
    out = Path(cfg.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    accelerator.wait_for_everyone()
    torch.manual_seed(cfg.seed)
    own = open_own_data(cfg)  # before the model loads: bad shards fail fast
    if cfg.stage in ("image_tokenizer", "semantic_tokenizer") and accelerator.is_main_process and not (out / "text_tokenizer").is_dir():
        save_text_tokenizer(out / "text_tokenizer", cfg)
    stage = make_stage(cfg, own)
    if cfg.train_only:
        freeze_all_but(stage.module, cfg.train_only)
    sharded = cfg.fsdp and accelerator.num_processes > 1
    skeleton = None
    if sharded:  # before the optimizer is built: it must hold the sharded parameters
        skeleton = meta_copy(stage.module) if accelerator.is_main_process else None
        shard_model(stage.module, accelerator.device, accelerator.num_processes, cfg.mixed_precision)
    params = [p for p in stage.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(stage.module, cfg.lr, cfg.lr_scales or {}), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    ema = EMAModel(params, decay=cfg.ema_decay) if cfg.ema_decay else None
    step, position = 0, 0
    resume = latest_checkpoint(out)
    if resume is not None:
        if sharded:
            step, position = load_sharded_checkpoint(resume, stage.module, optimizer, scheduler, accelerator)
        else:
            step, position = load_checkpoint(resume, stage, optimizer, scheduler, ema)
        logger.info("resumed from %s (step %d)", resume, step)
    model, optimizer = (stage.module, optimizer) if sharded else accelerator.prepare(stage.module, optimizer)
    metrics = MetricsLog(out, enabled=accelerator.is_main_process)
    bar = tqdm(total=cfg.steps, initial=step, disable=not accelerator.is_main_process, desc=cfg.stage)
    run_steps = 0
    while step < cfg.steps:
        t0 = time.perf_counter()
        samples = process_batch(cfg, position, accelerator.process_index, accelerator.num_processes, own)
        model.train()
        loss, parts = stage.loss(model, samples, sample_generators(cfg, samples))
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        if cfg.grad_clip > 0:
            accelerator.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        if ema is not None:
            ema.step(params)
        step += 1
        run_steps += 1
        position += cfg.batch_size
        mean_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
        parts = {k: accelerator.reduce(torch.tensor(v, device=accelerator.device), reduction="mean").item() for k, v in parts.items()}
        bar.update(1)
        bar.set_postfix(loss=f"{mean_loss:.4f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics.add(step, {"loss": mean_loss, **parts, "lr": scheduler.get_last_lr()[0], "samples_per_s": cfg.batch_size / (time.perf_counter() - t0)})
        at_checkpoint = step % cfg.checkpoint_every == 0 or step == cfg.steps
        if at_checkpoint and sharded:
            save_sharded_checkpoint(out, step, model, optimizer, scheduler, position, accelerator)
            if accelerator.is_main_process:
                prune_checkpoints(out, cfg.keep_checkpoints)
                metrics.plot()
        elif at_checkpoint:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                unwrapped = accelerator.unwrap_model(model)
                save_checkpoint(out, step, stage, unwrapped, optimizer, scheduler, position, ema)
                prune_checkpoints(out, cfg.keep_checkpoints)
                metrics.plot()
                with averaged_weights(ema, params):
                    save_preview(out / f"samples-{step:07d}.png", stage, unwrapped, cfg, own)
            accelerator.wait_for_everyone()
        if stop_after is not None and run_steps >= stop_after:
            break
    bar.close()
    metrics.close()
    if sharded and step >= cfg.steps:
        whole = gather_full_model(model, skeleton)  # every process sends its shards; the main one gets the model
        if accelerator.is_main_process:
            stage.save_final(whole, out / "final")
    elif not sharded:
        check_replicas(accelerator, params, out)
        if step >= cfg.steps and accelerator.is_main_process:
            with averaged_weights(ema, params):
                stage.save_final(accelerator.unwrap_model(model), out / "final")
    accelerator.wait_for_everyone()
    return out


def evaluate_loss(cfg: TrainConfig, model: str | os.PathLike, samples: int) -> float:
    """The mean training loss of `model` (a folder or a bundled name) on stream positions 0 .. samples - 1 of cfg's
    data, in eval mode (no condition dropout) with each sample's own noise (`sample_generators`): the same number for
    the same model, so it compares a model before and after fine-tuning on those samples. Text-to-image models and
    edit models alike (the loss reads their edit pairs through the parts the model has)."""
    stage = ModelStage(dataclasses.replace(cfg, stage="sft", init_from=str(model), lora=None))
    own = open_own_data(cfg)
    stage.module.eval()
    total = 0.0
    with torch.no_grad():
        for start in range(0, samples, cfg.batch_size):
            batch = process_batch(dataclasses.replace(cfg, batch_size=min(cfg.batch_size, samples - start)), start, 0, 1, own)
            loss, _ = stage.loss(stage.module, batch, sample_generators(cfg, batch))
            total += loss.item() * len(batch)
    return total / samples


@contextlib.contextmanager
def averaged_weights(ema: EMAModel | None, params: list[torch.Tensor]):
    """Within the block the parameters hold their EMA (nothing changes without EMA); restored afterwards."""
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def check_prefixes(module: nn.Module, prefixes: Iterable[str], setting: str) -> None:
    """A ValueError naming `setting` if some prefix matches no parameter name (a typo would silently do nothing)."""
    names = [name for name, _ in module.named_parameters()]
    for prefix in prefixes:
        if not any(name.startswith(prefix) for name in names):
            raise ValueError(f"{setting}: no parameter name starts with {prefix!r}")


def freeze_all_but(module: nn.Module, prefixes: list[str]) -> None:
    """Freeze every parameter whose name starts with none of `prefixes` (e.g. fine-tune a VAE's decoder only, so
    the latent space the diffusion model was trained on stays exactly as it was)."""
    check_prefixes(module, prefixes, "train_only")
    for name, p in module.named_parameters():
        if not any(name.startswith(prefix) for prefix in prefixes):
            p.requires_grad_(False)


def param_groups(module: nn.Module, lr: float, scales: dict[str, float]) -> list[dict]:
    """AdamW parameter groups of the trainable parameters: those whose names start with a prefix of `scales` learn
    at `lr` times its scale (the first matching prefix counts), the rest at `lr`. For example, parts that edit
    SFT adds start at zero and can learn faster than the pretrained ones they join."""
    check_prefixes(module, scales, "lr_scales")
    groups: dict[float, list[nn.Parameter]] = {1.0: []}  # the unscaled group first: the logged lr is group 0's
    for name, p in module.named_parameters():
        if p.requires_grad:
            scale = next((s for prefix, s in scales.items() if name.startswith(prefix)), 1.0)
            groups.setdefault(scale, []).append(p)
    return [{"params": ps, "lr": lr * scale} for scale, ps in groups.items() if ps]


def check_replicas(accelerator: Accelerator, params: list[torch.Tensor], out: Path) -> None:
    """With several processes, compare a checksum of every replica's parameters; record them in replicas.json."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    sums = accelerator.gather(checksum).tolist()
    if accelerator.is_main_process:
        (out / "replicas.json").write_text(json.dumps({"checksums": sums, "identical": len(set(sums)) == 1}))
        if len(set(sums)) != 1:
            logger.error("model replicas diverged: parameter checksums %s", sums)


def save_text_tokenizer(path: Path, cfg: TrainConfig) -> None:
    """Train the text tokenizer on data-engine text (with the image vocabulary of this stage's tokenizer)."""
    from ..models.semantic_blueprint import BlueprintConfig, SemanticVocab
    from ..models.text_tokenizer import build_text_tokenizer

    if cfg.stage == "semantic_tokenizer":
        parts = cfg.parts.get("semantic_tokenizer", {})
        geometry = {k: parts[k] for k in ("grid", "offset_bins", "letter_slots") if k in parts}
        codebook = SemanticVocab(BlueprintConfig(canvas=cfg.canvas, **geometry)).size
    else:
        codebook = cfg.parts.get("image_tokenizer", {}).get("codebook_size", 512)
    tok, _ = build_text_tokenizer(codebook, vocab_size=cfg.parts.get("text_vocab_size", 1024), seed=cfg.seed)
    tok.save_pretrained(path)


def save_preview(path: Path, stage: Stage, module: nn.Module, cfg: TrainConfig, own: OwnData | None = None) -> None:
    """A sample grid: held-out samples (own data: the first 8 of another shuffle, not held out) beside what the
    stage's module makes of them (reconstructions; or generated image and blueprint preview)."""
    from ..fileio import save_png
    from ..viz import image_grid

    samples = process_batch(dataclasses.replace(cfg, batch_size=8, seed=cfg.seed + 10_000, paraphrase_probability=0.0), 0, 0, 1, own)
    module.eval()
    with torch.no_grad():
        strips = stage.preview(module, samples)
    cells = [np.split(strip, strip.shape[1] // strip.shape[0], axis=1) for strip in strips]  # square images side by side
    save_png(path, image_grid(cells, [s["prompt"] for s in samples], tile=128, columns=2))
