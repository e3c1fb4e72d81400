"""Checkpoints: `output_dir/checkpoint-<step>/` holds the model in its Hugging Face format (LoRA SFT: only the
adapters, in peft's format), the optimizer state and RNG states in safetensors, and the step, data position and
LR-scheduler state in JSON; no pickle. They are written to a temporary folder and renamed into place, so a run
killed at any moment resumes from the last complete one. Under FSDP a checkpoint holds one shard file per process
instead of `model/`, the optimizer and RNG files (`fsdp.py`)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn

from ..fileio import InputError
from .fsdp import check_shards, like_param, load_shard, local, save_shard, shard_name

if TYPE_CHECKING:
    from .stages import Stage

CHECKPOINT_PREFIX = "checkpoint-"


def _optimizer_to_files(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (safetensors; under FSDP this process's pieces) and the rest
    (JSON): no pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{key}"] = local(value)
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"scalars": scalars, "param_groups": sd["param_groups"]}


def _optimizer_from_files(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    params = [p for group in optimizer.param_groups for p in group["params"]]  # the state dict's parameter indices
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = like_param(value, params[int(pid)])
    for pid, values in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    output_dir: Path, step: int, stage: Stage, module: nn.Module, optimizer, scheduler, data_position: int, ema: EMAModel | None = None
) -> Path:
    """Write checkpoint-<step> atomically (temporary folder, then rename). `model/` holds the trained weights
    (to resume); with EMA, `ema.safetensors` holds the averaged ones."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=output_dir))
    try:
        stage.save(module, tmp / "model")
        tensors, meta = _optimizer_to_files(optimizer)
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        save_file({"torch": torch.get_rng_state()}, str(tmp / "rng.safetensors"))  # e.g. VQ dead-code resampling
        state = {"step": step, "data_position": data_position, "optimizer": meta, "scheduler": scheduler.state_dict()}
        if ema is not None:
            save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)}, str(tmp / "ema.safetensors"))
            state["ema_step"] = ema.optimization_step
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def latest_checkpoint(output_dir: Path) -> Path | None:
    found = sorted(p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / "trainer_state.json").is_file())
    return found[-1] if found else None


def load_checkpoint(path: Path, stage: Stage, optimizer, scheduler, ema: EMAModel | None = None) -> tuple[int, int]:
    """Restore weights, optimizer, scheduler, RNG and EMA; returns (step, data position)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if "shards" in state:
        n = state["shards"]
        raise InputError(f"{path}: a sharded checkpoint of {n} processes; resume it with fsdp: true and {n} processes")
    if ema is not None:
        if "ema_step" not in state:
            raise InputError(f"{path}: has no EMA weights, but ema_decay is set; resume with the config it was trained with")
        shadow = load_file(str(path / "ema.safetensors"))
        for i, p in enumerate(ema.shadow_params):
            p.copy_(shadow[str(i)])
        ema.optimization_step = state["ema_step"]
    stage.load_weights(path / "model")
    _optimizer_from_files(optimizer, load_file(str(path / "optimizer.safetensors")), state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    return state["step"], state["data_position"]


def save_sharded_checkpoint(
    output_dir: Path, step: int, model: nn.Module, optimizer, scheduler, data_position: int, accelerator: Accelerator
) -> Path:
    """FSDP's checkpoint-<step>: every process writes its shard file into one temporary folder (on storage all
    processes share), then the main process adds trainer_state.json and renames the folder into place."""
    final = output_dir / f"{CHECKPOINT_PREFIX}{step:07d}"
    tmp = output_dir / f".{final.name}.partial"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    tensors, meta = _optimizer_to_files(optimizer)
    save_shard(tmp / shard_name(accelerator.process_index, accelerator.num_processes), model, tensors)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "data_position": data_position, "optimizer": meta, "scheduler": scheduler.state_dict(),
                 "shards": accelerator.num_processes}
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    accelerator.wait_for_everyone()
    return final


def load_sharded_checkpoint(path: Path, model: nn.Module, optimizer, scheduler, accelerator: Accelerator) -> tuple[int, int]:
    """Restore this process's shard of the weights and optimizer state, its RNG, and the scheduler; returns (step,
    data position)."""
    state = json.loads((path / "trainer_state.json").read_text())
    if "shards" not in state:
        raise InputError(f"{path}: not a sharded checkpoint; resume it with the fsdp setting and process count that wrote it")
    check_shards(path, accelerator.num_processes, state["shards"])
    tensors = load_shard(path / shard_name(accelerator.process_index, accelerator.num_processes), model)
    _optimizer_from_files(optimizer, tensors, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["data_position"]


def prune_checkpoints(out: Path, keep: int) -> None:
    found = sorted(p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
