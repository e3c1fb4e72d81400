"""Run configs: the settings every trainer shares (`RunConfig`), the training stages' `TrainConfig`, and reading
either from YAML, where `extends: OTHER.yaml` starts from another file."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..fileio import InputError
from ..shapeworld.edits import PLACEMENTS

if TYPE_CHECKING:
    from .lora import LoraSettings

STAGES = ("image_tokenizer", "semantic_tokenizer", "vae", "pretrain", "sft", "edit_sft")
SCENE_STAGES = ("image_tokenizer", "semantic_tokenizer")  # their losses read the data engine's scenes
MODEL_STAGES = ("pretrain", "sft", "edit_sft")  # the stages that train the whole model (the ones FSDP shards)
EDIT_REFERENCES = ("encoded", "exact")  # where an edit pair's reference blueprint comes from (TrainConfig.edit_references)


@dataclass
class RunConfig:
    """The settings every trainer shares: the training stages' (`TrainConfig`) and GRPO's (`grpo_config.GRPOConfig`).
    YAML keys are the field names; unknown keys are rejected. A trainer whose defaults differ redeclares those fields
    with `redefault`."""

    stage: str = field(default="pretrain", metadata={"help": "which stage this file runs (`blip3o train` picks the trainer by it)"})
    output_dir: str = field(default="runs/pretrain", metadata={"help": "checkpoints, metrics.csv, TensorBoard logs and PNGs go here"})
    init_from: str | None = field(default=None, metadata={"help": "the model to start from (a bundled name or a folder)"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 disables)"})
    seed: int = field(default=0, metadata={"help": "seeds the data stream, initialisation and noise"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "older checkpoints are deleted"})
    reader: bool = field(
        default=False,
        metadata={"help": "models (sft, edit_sft, grpo): freeze a copy of the starting AR side as the reader that re-reads each blueprint "
                          "for the renderer, so training the AR side never moves the renderer's input (saved with the model; a model "
                          "that has one keeps it)"},
    )

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> Any:
        return config_from_yaml(cls, path, **overrides)


def redefault(name: str, default: Any, help: str | None = None) -> Any:
    """RunConfig's field `name` for a subclass that redeclares it: another default, and optionally its own help."""
    return field(default=default, metadata={"help": help or RunConfig.__dataclass_fields__[name].metadata["help"]})


@dataclass
class TrainConfig(RunConfig):
    """Settings of one training run of a stage (YAML keys are these field names; unknown keys are rejected)."""

    stage: str = redefault("stage", "pretrain", f"one of {', '.join(STAGES)}")
    init_from: str | None = redefault(
        "init_from", None, "sft / edit_sft: the model folder to start from; vae: a VAE folder to fine-tune; semantic_tokenizer: an encoder (or a model) to fine-tune"
    )
    batch_size: int = field(default=32, metadata={"help": "global batch (split across processes)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay floor, as a fraction of lr"})
    canvas: int = field(default=64, metadata={"help": "image size in px"})
    paraphrase_probability: float = field(default=0.5, metadata={"help": "share of captions that are paraphrases"})
    category_weights: dict[str, float] | None = field(default=None, metadata={"help": "t2i category mix (default: all)"})
    edit_fraction: float = field(default=0.75, metadata={"help": "edit_sft: share of each batch that is edit pairs (the rest is t2i)"})
    edit_category_weights: dict[str, float] | None = field(default=None, metadata={"help": "edit_sft: edit category mix (default: all 9, keep included)"})
    edit_placement: str = field(default="uniform", metadata={"help": "edit_sft: where add and move put their object: uniform (any free place "
                                                               "that satisfies the instruction) or nearest (one place per pair; shapeworld.edits.PLACEMENTS)"})
    edit_references: str = field(
        default="encoded",
        metadata={"help": "edit_sft with a semantic blueprint: the reference blueprint the AR model reads: encoded (the model's own "
                  "encoder reading the source's pixels, as at inference) or exact (the source scene's own blueprint, so that every "
                  "token an edit does not change is a copy, and the edit change weight falls on the edit alone)"},
    )
    log_every: int = field(default=10, metadata={"help": "steps between metric rows"})
    mixed_precision: str = field(default="no", metadata={"help": "no / fp16 / bf16 (accelerate; with fsdp, no / bf16)"})
    fsdp: bool = field(
        default=False,
        metadata={"help": "pretrain / sft / edit_sft with several processes: shard the weights, gradients and optimizer state "
                  "over them (FSDP2) instead of a whole copy per process (DDP). Checkpoints hold one shard file per process "
                  "(resume with the same process count); final/ is the whole model. No sample grids, EMA or LoRA; one process "
                  "runs unsharded"},
    )
    ema_decay: float = field(
        default=0.0, metadata={"help": "EMA of the trained weights (diffusers' EMAModel), used for sample grids and the final model; 0 = off"}
    )
    train_only: list[str] | None = field(
        default=None, metadata={"help": "train only parameters whose names start with one of these prefixes (e.g. [decoder]); the rest stay frozen"}
    )
    lora: dict[str, Any] | None = field(
        default=None,
        metadata={"help": "sft: train LoRA adapters only, every base weight frozen ({rank, alpha, dropout, parts: [ar, transformer], "
                  "target_modules: {part: [names]}}; blip3o_next.training.lora.LoraSettings). Checkpoints hold the adapters; final/ is the "
                  "merged model, final/adapters/<part>/ the adapters (peft format)"},
    )
    lr_scales: dict[str, float] | None = field(
        default=None, metadata={"help": "LR multipliers for parameters whose names start with these prefixes (e.g. {reference_connector: 10})"}
    )
    text_tokenizer_dir: str | None = field(default=None, metadata={"help": "pretrain: the trained text tokenizer folder"})
    image_tokenizer_dir: str | None = field(default=None, metadata={"help": "pretrain: the trained image tokenizer folder"})
    vae_dir: str | None = field(default=None, metadata={"help": "pretrain: the trained VAE folder"})
    parts: dict[str, Any] = field(default_factory=dict, metadata={"help": "overrides of the tiny preset's part configs"})
    model: dict[str, Any] = field(default_factory=dict, metadata={"help": "Blip3oNextConfig fields (loss weights, dropout)"})
    max_prompt_tokens: int = field(default=64, metadata={"help": "longer captions keep their first tokens"})
    data: str | None = field(
        default=None,
        metadata={"help": "train on your own WebDataset tar shards instead of the data engine: a folder of .tar files, a glob, or a "
                  "brace pattern (shards/{00000..00099}.tar), in img2dataset's layout (jpg/png/webp + txt, or json 'caption'; "
                  "edit_sft also source.<ext> + target.<ext> + instruction). Seeded shuffle per epoch, resumes exactly; "
                  "blip3o_next.training.own_data. The data engine's settings (category weights, paraphrases, edit_fraction) then do nothing"},
    )

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {', '.join(STAGES)}, got {self.stage!r}")
        if self.steps < 1 or self.batch_size < 1 or self.checkpoint_every < 1:
            raise ValueError("steps, batch_size and checkpoint_every must be >= 1")
        if self.stage in ("sft", "edit_sft") and not self.init_from:
            raise ValueError(f"the {self.stage} stage needs init_from (a model folder, or a bundled model's name)")
        if self.reader and self.stage not in ("sft", "edit_sft"):
            raise ValueError(f"reader freezes a trained model's AR side for its renderer: sft or edit_sft, not {self.stage}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.edit_fraction < 1:
            raise ValueError(f"edit_fraction must be in (0, 1) so that every batch mixes edits and t2i, got {self.edit_fraction}")
        if self.edit_placement not in PLACEMENTS:
            raise ValueError(f"edit_placement must be one of {', '.join(PLACEMENTS)}, got {self.edit_placement!r}")
        if self.edit_references not in EDIT_REFERENCES:
            raise ValueError(f"edit_references must be one of {', '.join(EDIT_REFERENCES)}, got {self.edit_references!r}")
        if self.edit_references != "encoded" and self.stage != "edit_sft":
            raise ValueError(f"edit_references is an edit_sft setting, not one of the {self.stage} stage")
        if self.stage == "pretrain" and not (self.text_tokenizer_dir and self.image_tokenizer_dir and self.vae_dir):
            raise ValueError("the pretrain stage needs text_tokenizer_dir, image_tokenizer_dir and vae_dir")
        if self.lora is not None:
            self.lora_settings()  # a bad setting fails here, before any model loads
        if self.data is not None and self.stage in SCENE_STAGES:
            raise ValueError(f"the {self.stage} stage learns from the data engine's scenes, which own data has none of; leave data unset")
        if self.fsdp:
            self.check_fsdp()

    def check_fsdp(self) -> None:
        """FSDP shards the model stages' Blip3oNext; the other stages' modules are small enough to copy to every process."""
        if self.stage not in MODEL_STAGES:
            raise ValueError(f"fsdp shards the {', '.join(MODEL_STAGES)} models, not the {self.stage} stage's; leave fsdp unset")
        if self.lora is not None or self.ema_decay:
            raise ValueError("fsdp does not combine with lora or ema_decay; unset one of them")
        if self.mixed_precision == "fp16":
            raise ValueError("fsdp computes in float32 or bf16; set mixed_precision to no or bf16")

    def lora_settings(self) -> LoraSettings:
        """The `lora` mapping, checked: only SFT adapts a trained model (pretrain's parts start random, and edit SFT's
        new parts have no base weights to adapt), and LoRA decides alone what trains."""
        from .lora import LoraSettings

        if self.stage != "sft":
            raise ValueError(f"lora is for the sft stage, not {self.stage}")
        if self.train_only:
            raise ValueError("lora trains the adapters only; leave train_only unset")
        return LoraSettings.from_dict(self.lora)


def config_from_yaml(cls: type, path: str | os.PathLike, **overrides: Any) -> Any:
    """Read a config dataclass from YAML. `extends: OTHER.yaml` (relative to this file) starts from another
    config, which may extend a third; keys given here replace its keys (whole values: a `model:` mapping here
    replaces the base's). Overrides that are None are ignored; unknown keys and invalid values raise a one-line
    InputError."""
    return config_from_mapping(cls, read_extended_yaml(path), path, **overrides)


def config_from_mapping(cls: type, data: dict, path: str | os.PathLike, **overrides: Any) -> Any:
    """`config_from_yaml` for keys already read from `path` (errors name it)."""
    data = {**data, **{k: v for k, v in overrides.items() if v is not None}}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{path}: unknown setting(s) {', '.join(unknown)}")
    try:
        return cls(**data)
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: {e}") from None


def read_extended_yaml(path: str | os.PathLike, seen: tuple[Path, ...] = ()) -> dict:
    """A config file's keys over those of the chain of files it `extends:` (each path relative to its file)."""
    path = Path(path).resolve()
    if path in seen:
        raise InputError(f"{path}: `extends:` leads back to this file")
    data = read_yaml(path)
    if "extends" not in data:
        return data
    base = read_extended_yaml(path.parent / str(data.pop("extends")), (*seen, path))
    return {**base, **data}


def read_yaml(path: str | os.PathLike) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise InputError(f"{path}: cannot read the config ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of settings")
    return data
