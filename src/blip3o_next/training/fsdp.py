"""FSDP for the model stages (pretrain, SFT, edit SFT): parameters, gradients and optimizer state sharded over the
processes (torch's FSDP2 `fully_shard`), and the per-process shard files a sharded checkpoint holds.

Why the trainer shards the model itself instead of through accelerate's FSDP plugin: accelerate 1.15 turns its plugin
on only for GPU process groups (on CPUs `Accelerator(fsdp_plugin=...)` stays MULTI_CPU, i.e. DDP), so the plugin
could not be tested on the CPU with gloo; `fully_shard` is the same call on both. Sharding is also model knowledge:
each Qwen3 decoder layer and each SANA transformer block is its own unit (gathered only while it runs), everything
else trainable is the root unit, and the frozen image tokenizer and VAE are left whole on every process, because the
training loss calls them (`encode`) outside the model's forward, where sharded weights are never gathered.

A shard file (`shard-<rank>-of-<world>.safetensors`) holds this process's pieces of the model (`model.<name>`) and of
the optimizer state (`optimizer.<param index>.<key>`), and its RNG state (`rng.torch`). The frozen encoders are not
in it: the stage rebuilds them as they were. Safetensors only (torch.distributed.checkpoint writes its metadata with
pickle). Resuming needs the process count that wrote the checkpoint.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.tensor import DTensor

from ..fileio import InputError

UNSHARDED = ("image_tokenizer", "vae")  # frozen encoders the loss calls outside forward: whole on every process
UNSHARDED_KEYS = tuple(f"{name}." for name in UNSHARDED)
LAYER_CLASSES = ("Qwen3DecoderLayer", "SanaTransformerBlock")  # each its own FSDP unit


def shard_model(model: nn.Module, device: torch.device, world_size: int, mixed_precision: str = "no") -> None:
    """Shard `model` in place over `world_size` processes on `device` (the process group must exist). bf16 mixed
    precision computes in bf16 from float32 sharded weights and reduces gradients in float32."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    bf16 = mixed_precision == "bf16"
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    unsharded = [getattr(model, name) for name in UNSHARDED]
    for part in unsharded:
        part.to(device)
    for module in model.modules():
        if type(module).__name__ in LAYER_CLASSES:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params={p for part in unsharded for p in part.parameters()})


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters are on the meta device (no memory; tied ones stay tied): what the final
    export fills with the gathered weights, since the sharded model only ever yields its shards."""
    memo = {id(p): nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad) for p in model.parameters()}
    return copy.deepcopy(model, memo)


def gather_full_model(model: nn.Module, skeleton: nn.Module | None) -> nn.Module | None:
    """The whole trained model on the CPU, in `skeleton` (from `meta_copy`), on the main process (None elsewhere).
    Every process must call it: the weights are gathered from all of them."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if skeleton is None:
        return None
    filled: dict[nn.Parameter, nn.Parameter] = {}  # meta parameter -> its weights: a shared one is filled once, so ties survive
    for prefix, module in skeleton.named_modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if p not in filled:
                    filled[p] = nn.Parameter(full[f"{prefix}.{name}" if prefix else name], requires_grad=p.requires_grad)
                module._parameters[name] = filled[p]
    skeleton.load_state_dict(full)  # buffers; and a missing or unexpected name fails here
    return skeleton


def local_view(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of a sharded tensor, in place (a plain tensor is its own piece)."""
    return t.to_local() if isinstance(t, DTensor) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's piece of a sharded tensor, copied to the CPU for safetensors."""
    return local_view(t).detach().cpu().contiguous()


def like_param(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A saved piece of optimizer state as `param` is held: this process's piece of a sharded tensor (optimizer
    state of a sharded parameter must be sharded the same way), or the plain tensor."""
    if not isinstance(param, DTensor) or value.ndim == 0:  # Adam's `step` is a plain scalar
        return value
    mesh, placements = param.device_mesh, param.placements
    return DTensor.from_local(value.to(param.device), mesh, placements, run_check=False, shape=param.shape, stride=param.stride())


def shard_name(rank: int, world_size: int) -> str:
    return f"shard-{rank:05d}-of-{world_size:05d}.safetensors"


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The sharded model's parameters (as this process holds them) and buffers, each shared one once (a tied lm_head
    is the embedding), the frozen encoders left out."""
    named = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {name: t for name, t in named.items() if not name.startswith(UNSHARDED_KEYS)}


def model_pieces(model: nn.Module) -> dict[str, torch.Tensor]:
    """This process's pieces of the model's state, named as in a shard file."""
    return {f"model.{name}": local(t) for name, t in model_state(model).items()}


def save_shard(path: Path, model: nn.Module, optimizer_tensors: dict[str, torch.Tensor]) -> None:
    """Write this process's shard file: its model pieces, optimizer state pieces and RNG state."""
    optimizer_pieces = {f"optimizer.{k}": v for k, v in optimizer_tensors.items()}
    save_file({**model_pieces(model), **optimizer_pieces, "rng.torch": torch.get_rng_state()}, str(path))


def check_shards(folder: Path, world_size: int, written_by: int) -> None:
    """Every process checks every shard file's header before any loads (so all stop with the same error): one line
    naming the file that is missing or unreadable, or the process count that does not match."""
    if world_size != written_by:
        raise InputError(f"{folder}: written by {written_by} processes; resume it with {written_by} (this run has {world_size})")
    for rank in range(world_size):
        path = folder / shard_name(rank, world_size)
        if not path.is_file():
            raise InputError(f"{path}: missing shard of this sharded checkpoint")
        try:
            with safe_open(str(path), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise InputError(f"{path}: unreadable shard ({str(e).strip().splitlines()[0]})") from None


def load_shard(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy this process's model pieces from its shard file into the sharded model, restore its RNG state, and return
    the optimizer state pieces. A missing or misshapen piece raises one line naming the file and the tensor."""
    try:
        saved = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(f"{path}: unreadable shard ({str(e).strip().splitlines()[0]})") from None
    pieces = {f"model.{name}": local_view(t) for name, t in model_state(model).items()}
    for key, piece in pieces.items():
        if key not in saved:
            raise InputError(f"{path}: has no {key}; was it written for this model?")
        if saved[key].shape != piece.shape:
            raise InputError(f"{path}: {key} has shape {tuple(saved[key].shape)}, this process holds {tuple(piece.shape)}")
    with torch.no_grad():
        for key, piece in pieces.items():
            piece.copy_(saved[key])
    torch.set_rng_state(saved["rng.torch"])
    return {k.removeprefix("optimizer."): v for k, v in saved.items() if k.startswith("optimizer.")}
