"""Training on accelerate: one loop for every stage (image tokenizer, VAE, pretrain, SFT), configured by YAML.

Reads like nanoGPT's train.py: settings, data, model, optimizer, then the loop. Runs unchanged under
`accelerate launch` or `torchrun` (DDP; with `fsdp: true` FSDP, `fsdp.py`; gloo on CPU). The data is one global
stream indexed by sample position (the data engine's, or with `data:` your own shards', `own_data.py`): every step
takes the next `batch_size` samples and each process its contiguous slice, so a run with N processes sees exactly the
batches of a single-process run.

Checkpoints (`output_dir/checkpoint-<step>/`) hold the model in its Hugging Face format (LoRA SFT: only the
adapters, in peft's format), the optimizer state and RNG states in safetensors, and the step, data position and
LR-scheduler state in JSON. They are written to a temporary folder and renamed into place, so a run killed at any
moment resumes from the last complete one. Under FSDP a checkpoint holds one shard file per process instead of
`model/`, the optimizer and RNG files (`fsdp.py`), and `final/` is the whole model as without it.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..fileio import InputError
from .fsdp import check_shards, gather_full_model, like_param, load_shard, local, meta_copy, save_shard, shard_model, shard_name
from ..shapeworld.edits import PLACEMENTS

if TYPE_CHECKING:
    from .lora import LoraSettings
    from .own_data import OwnData

logger = logging.getLogger(__name__)

STAGES = ("image_tokenizer", "semantic_tokenizer", "vae", "pretrain", "sft", "edit_sft")
SCENE_STAGES = ("image_tokenizer", "semantic_tokenizer")  # their losses read the data engine's scenes
MODEL_STAGES = ("pretrain", "sft", "edit_sft")  # the stages that train the whole model (the ones FSDP shards)
CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class TrainConfig:
    """Settings of one training run (YAML keys are these field names; unknown keys are rejected)."""

    stage: str = field(default="pretrain", metadata={"help": f"one of {', '.join(STAGES)}"})
    output_dir: str = field(default="runs/pretrain", metadata={"help": "checkpoints, metrics.csv, TensorBoard logs and PNGs go here"})
    steps: int = field(default=1000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=32, metadata={"help": "global batch (split across processes)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "cosine decay floor, as a fraction of lr"})
    warmup_steps: int = field(default=50, metadata={"help": "linear warmup steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm (0 disables)"})
    seed: int = field(default=0, metadata={"help": "seeds the data stream, initialisation and noise"})
    canvas: int = field(default=64, metadata={"help": "image size in px"})
    paraphrase_probability: float = field(default=0.5, metadata={"help": "share of captions that are paraphrases"})
    category_weights: dict[str, float] | None = field(default=None, metadata={"help": "t2i category mix (default: all)"})
    edit_fraction: float = field(default=0.75, metadata={"help": "edit_sft: share of each batch that is edit pairs (the rest is t2i)"})
    edit_category_weights: dict[str, float] | None = field(default=None, metadata={"help": "edit_sft: edit category mix (default: all 9, keep included)"})
    edit_placement: str = field(default="uniform", metadata={"help": "edit_sft: where add and move put their object: uniform (any free place "
                                                               "that satisfies the instruction) or nearest (one place per pair; shapeworld.edits.PLACEMENTS)"})
    checkpoint_every: int = field(default=200, metadata={"help": "steps between checkpoints (and at the end)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "older checkpoints are deleted"})
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
    init_from: str | None = field(default=None, metadata={"help": "sft / edit_sft: the model folder to start from; vae: a VAE folder to fine-tune"})
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
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if not 0 < self.edit_fraction < 1:
            raise ValueError(f"edit_fraction must be in (0, 1) so that every batch mixes edits and t2i, got {self.edit_fraction}")
        if self.edit_placement not in PLACEMENTS:
            raise ValueError(f"edit_placement must be one of {', '.join(PLACEMENTS)}, got {self.edit_placement!r}")
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

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, **overrides: Any) -> "TrainConfig":
        return config_from_yaml(cls, path, **overrides)


def config_from_yaml(cls: type, path: str | os.PathLike, **overrides: Any) -> Any:
    """Read a config dataclass from YAML. `extends: OTHER.yaml` (relative to this file) starts from another
    config, which may extend a third; keys given here replace its keys (whole values: a `model:` mapping here
    replaces the base's). Overrides that are None are ignored; unknown keys and invalid values raise a one-line
    InputError."""
    data = read_extended_yaml(path)
    data.update({k: v for k, v in overrides.items() if v is not None})
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


# ----------------------------------------------------------------------------- stages


class Stage(Protocol):
    module: nn.Module  # what the optimizer trains (its frozen parts have requires_grad False)

    def loss(self, model: nn.Module, samples: list[dict], generators: list[torch.Generator]) -> tuple[torch.Tensor, dict[str, float]]: ...

    def save(self, module: nn.Module, path: Path) -> None: ...

    def load_weights(self, path: Path) -> None: ...

    def save_final(self, module: nn.Module, path: Path) -> None: ...

    def preview(self, module: nn.Module, samples: list[dict]) -> np.ndarray: ...


def _images(samples: list[dict]) -> torch.Tensor:
    from ..models.image_tokenizer import images_to_tensor

    return images_to_tensor(np.stack([s["image"] for s in samples]))


class PretrainedModuleStage:
    """Saving and reloading a stage's module, which (like every part) has save_pretrained / from_pretrained."""

    module: nn.Module

    def save(self, module: nn.Module, path: Path) -> None:
        module.save_pretrained(path)

    def load_weights(self, path: Path) -> None:
        self.module.load_state_dict(type(self.module).from_pretrained(path, use_safetensors=True).state_dict())

    def save_final(self, module: nn.Module, path: Path) -> None:
        """The finished run's `final/`: the module as a checkpoint holds it."""
        self.save(module, path)


class ImageTokenizerStage(PretrainedModuleStage):
    """The VQ image tokenizer with its semantic objective (the text tokenizer is trained up front by `train`)."""

    def __init__(self, cfg: TrainConfig):
        from ..models.image_tokenizer import ImageTokenizer

        self.module = ImageTokenizer(image_size=cfg.canvas, **cfg.parts.get("image_tokenizer", {}))

    def loss(self, model, samples, generators):
        from ..models.image_tokenizer import semantic_batch
        from ..shapeworld.world import Scene

        device = next(model.parameters()).device
        labels = semantic_batch([Scene.from_dict(s["scene"]) for s in samples], self.module.grid)
        out = model(_images(samples).to(device), *(t.to(device) for t in labels))
        return out.loss, out.losses

    def preview(self, module, samples):
        from ..models.image_tokenizer import tensor_to_images

        x = _images(samples)
        return np.concatenate([tensor_to_images(x), tensor_to_images(module.decode(module.encode(x)))], axis=2)


class SemanticTokenizerStage(PretrainedModuleStage):
    """The semantic tokenizer's encoder: images -> the exact blueprints of their scenes. Half the scenes are the
    text-to-image stream's, half fully random ones (any size, colored words, up to 5 shapes: what edits and generated
    images hold); `degrade_probability` of the images are degraded as generated images are."""

    random_scene_probability = 0.5
    degrade_probability = 0.6

    def __init__(self, cfg: TrainConfig):
        from ..models.semantic_encoder import SemanticEncoder

        self.module = SemanticEncoder(image_size=cfg.canvas, **cfg.parts.get("semantic_tokenizer", {}))

    def loss(self, model, samples, generators):
        from ..models.image_tokenizer import images_to_tensor
        from ..models.semantic_blueprint import encode_scene
        from ..shapeworld.degrade import DEGRADATIONS
        from ..shapeworld.render import render
        from ..shapeworld.sampler import sample_scene
        from ..shapeworld.world import Scene

        images, ids = [], []
        kinds = [d for name, d in DEGRADATIONS.items() if name != "clean"]
        for sample, g in zip(samples, generators):
            rng = np.random.default_rng(int(torch.randint(2**31, (1,), generator=g)))
            scene, image = Scene.from_dict(sample["scene"]), sample["image"]
            if rng.random() < self.random_scene_probability:
                scene = sample_scene(rng, scene.canvas)
                image = render(scene)
            try:  # about 1 scene in 20,000 has two anchors in one cell (a one-letter word beside a small shape)
                ids.append(encode_scene(scene, self.module.vocab))
            except ValueError:
                continue
            if rng.random() < self.degrade_probability:
                image = kinds[int(rng.integers(len(kinds)))].apply(image, rng)
            images.append(image)
        device = next(model.parameters()).device
        out = model(images_to_tensor(np.stack(images)).to(device), torch.tensor(ids, device=device))
        return out.loss, out.losses

    def preview(self, module, samples):
        from ..models.semantic_blueprint import preview

        x = _images(samples)
        ids = module.encode(x.to(next(module.parameters()).device)).cpu()
        return np.concatenate([np.stack([s["image"] for s in samples]), np.stack([np.asarray(preview(i, module.vocab)) for i in ids])], axis=2)


class VaeStage(PretrainedModuleStage):
    """DC-AE trained as a plain autoencoder (DC-AE has no KL term), L1 + MSE."""

    def __init__(self, cfg: TrainConfig, own: OwnData | None = None):
        from diffusers import AutoencoderDC

        from ..models.vae import tiny_vae_config

        if cfg.init_from:
            self.module = AutoencoderDC.from_pretrained(cfg.init_from, torch_dtype=torch.float32, use_safetensors=True)
        else:
            self.module = AutoencoderDC(**{**tiny_vae_config(), **cfg.parts.get("vae", {})})
        self.calibration_seed, self.canvas, self.own = cfg.seed + 20_000, cfg.canvas, own

    @functools.cached_property
    def calibration_images(self) -> torch.Tensor:
        """256 fixed images (the same on resume) on which every save calibrates the latent scaling factor: the
        training data's, so the latents the diffusion model learns have unit variance on the images it will see."""
        from ..shapeworld.dataset import t2i_samples

        if self.own is not None:
            return _images([self.own.sample(i, self.calibration_seed) for i in range(256)])
        return _images(list(islice(t2i_samples(self.calibration_seed, self.canvas), 256)))

    def save(self, module: nn.Module, path: Path) -> None:
        from ..models.vae import calibrate_scaling_factor

        was_training = module.training
        calibrate_scaling_factor(module.eval(), self.calibration_images.to(next(module.parameters()).device))
        module.train(was_training)
        module.save_pretrained(path)

    def loss(self, model, samples, generators):
        x = _images(samples).to(next(model.parameters()).device)
        rec = model(x).sample
        l1, mse = (rec - x).abs().mean(), ((rec - x) ** 2).mean()
        return l1 + mse, {"l1": l1.item(), "mse": mse.item()}

    def preview(self, module, samples):
        from ..models.image_tokenizer import tensor_to_images

        x = _images(samples)
        return np.concatenate([tensor_to_images(x), tensor_to_images(module(x).sample.clamp(-1, 1))], axis=2)


class ModelStage(PretrainedModuleStage):
    """Pretrain / SFT of the AR model, connector and diffusion transformer; tokenizer and VAE frozen."""

    def __init__(self, cfg: TrainConfig):
        from diffusers import AutoencoderDC
        from transformers import PreTrainedTokenizerFast

        from ..models.modeling import Blip3oNext, Blip3oNextConfig, build_model, image_tokenizer_class, tiny_parts_configs
        from ..models.semantic_encoder import SemanticEncoder

        self.cfg = cfg
        if cfg.stage in ("sft", "edit_sft"):
            from ..pipeline import resolve_model_path

            model = Blip3oNext.from_pretrained(resolve_model_path(cfg.init_from), torch_dtype=torch.float32)
            model.config = dataclasses.replace(model.config, **cfg.model)
        else:
            tok = PreTrainedTokenizerFast.from_pretrained(cfg.text_tokenizer_dir)
            folder = Path(cfg.image_tokenizer_dir)
            image_tokenizer = image_tokenizer_class(folder).from_pretrained(folder, use_safetensors=True)
            vae = AutoencoderDC.from_pretrained(cfg.vae_dir, use_safetensors=True)
            semantic = isinstance(image_tokenizer, SemanticEncoder)
            configs = tiny_parts_configs(vocab_size=0, codebook_size=image_tokenizer.codebook_size, semantic=semantic)
            for name, override in cfg.parts.items():
                configs[name].update(override)
            model = build_model(tok, configs, Blip3oNextConfig(image_size=cfg.canvas, **cfg.model), image_tokenizer=image_tokenizer, vae=vae)
        for part in (model.image_tokenizer, model.vae):
            part.requires_grad_(False).eval()
        self.module = model

    def loss(self, model, samples, generators):
        """Samples with a "reference" image are edits (caption = instruction, image = target); the rest t2i."""
        from ..models.autoregressive import build_sequences
        from ..models.vae import encode_latents

        core = self.module
        core.image_tokenizer.eval()  # frozen: eval mode also stops the VQ codebook's EMA updates
        core.vae.eval()
        device = next(p for p in model.parameters() if p.requires_grad).device
        exact = core.semantic and all("scene" in s for s in samples)
        if exact:
            samples, codes = self.exact_blueprints(samples)
            codes = codes.to(device)
        x = _images(samples).to(device)
        is_edit = torch.tensor(["reference" in s for s in samples], device=device)
        reference_codes, reference_latents = None, None
        with torch.no_grad():
            if not exact:  # VQ codes; or own data's semantic blueprints, as the model's own encoder reads its images
                codes = core.image_tokenizer.encode(x)
            latents = encode_latents(core.vae, x)
            if is_edit.any():  # only the edit rows' references are encoded; t2i rows keep placeholders the model never reads
                r = _images([{"image": s["reference"]} for s in samples if "reference" in s]).to(device)
                reference_latents = latents.clone()
                reference_latents[is_edit] = encode_latents(core.vae, r)
                edit_codes = iter(core.image_tokenizer.encode(r).tolist())
                reference_codes = [next(edit_codes) if e else None for e in is_edit.tolist()]
        ids, mask, labels = build_sequences(
            core.tokenizer, core.image_vocab, [s["caption"] for s in samples], codes, self.cfg.max_prompt_tokens, reference_codes
        )
        out = model(ids.to(device), mask.to(device), labels.to(device), latents, generators, reference_latents, is_edit if is_edit.any() else None)
        return out.loss, {"ce": out.ce_loss.item(), "flow_matching": out.flow_matching_loss.item()}

    @staticmethod
    def exact_blueprints(samples: list[dict]) -> tuple[list[dict], torch.Tensor]:
        """A semantic blueprint's training targets: the exact blueprints of the samples' scenes (the data engine
        knows them; `loss` lets the encoder read images without a scene, such as own data's). Scenes the codec cannot
        write are skipped (about 1 in 20,000: a one-letter word beside a small shape, both anchored in one cell)."""
        from ..models.semantic_blueprint import encode_scene
        from ..shapeworld.world import Scene

        kept, codes = [], []
        for s in samples:
            try:
                codes.append(encode_scene(Scene.from_dict(s["scene"])))
            except ValueError:
                continue
            kept.append(s)
        return kept, torch.tensor(codes)

    def preview(self, module, samples):
        from ..pipeline import Pipeline

        out = Pipeline(module)([s["prompt"] for s in samples], seed=0, num_inference_steps=10)
        truth = np.stack([s["image"] for s in samples])
        return np.concatenate([truth, np.stack([np.asarray(i) for i in out.images]), np.stack([np.asarray(i) for i in out.blueprint_previews])], axis=2)


class EditStage(ModelStage):
    """Edit SFT: a text-to-image model gains the reference-image paths (enable_editing) and trains on edit pairs
    of all categories mixed with t2i samples, so generation does not regress."""

    SWITCHES = ("reference_cross_attention", "reference_noise_injection", "reference_injection_axis", "separate_edit_ar")

    def __init__(self, cfg: TrainConfig):
        from ..models.modeling import enable_editing

        super().__init__(cfg)
        switches = {k: cfg.model[k] for k in self.SWITCHES if k in cfg.model}
        enable_editing(self.module, cfg.parts.get("reference_connector"), **switches)  # tokenizer and VAE stay frozen
        if self.module.edit_ar is not None:  # text to image keeps the AR model it started with
            self.module.ar.requires_grad_(False)

    def preview(self, module, samples):
        """Per sample: source (blank for t2i), truth, output, blueprint preview."""
        from ..pipeline import Pipeline

        pipe = Pipeline(module)
        strips = []
        for s in samples:
            kw = dict(seed=0, num_inference_steps=10)
            out = pipe.edit(s["reference"], s["caption"], **kw) if "reference" in s else pipe(s["caption"], **kw)
            source = s.get("reference", np.full_like(s["image"], 255))
            strips.append(np.concatenate([source, s["image"], np.asarray(out.images[0]), np.asarray(out.blueprint_previews[0])], axis=1))
        return np.stack(strips)


class LoraStage(ModelStage):
    """SFT through LoRA adapters (`lora.py`): only the adapters train. A checkpoint's model folder holds just the
    adapters, one folder per part; `final/` is the merged model, which loads as any other, with the adapters
    beside it in `final/adapters/<part>/`. The adapters live in the module's parts; `self.adapters` are peft's
    handles on them, which save and merge them."""

    def __init__(self, cfg: TrainConfig):
        from .lora import add_adapters

        super().__init__(cfg)
        self.adapters = add_adapters(self.module, cfg.lora_settings())

    def save(self, module: nn.Module, path: Path) -> None:
        from .lora import save_adapters

        save_adapters(self.adapters, path)

    def load_weights(self, path: Path) -> None:
        from .lora import restore_adapter_weights

        restore_adapter_weights(self.adapters, path)

    def save_final(self, module: nn.Module, path: Path) -> None:
        from .lora import merge_adapters, save_adapters

        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # the merged model's save replaces `path` whole
            save_adapters(self.adapters, Path(tmp) / "adapters")
            merge_adapters(module, self.adapters).save_pretrained(path)
            shutil.move(Path(tmp) / "adapters", path / "adapters")


def make_stage(cfg: TrainConfig, own: OwnData | None = None) -> Stage:
    """The stage `cfg` trains; `own` is its own data, which the VAE stage also calibrates its latent scale on."""
    if cfg.lora is not None:
        return LoraStage(cfg)
    if cfg.stage == "vae":
        return VaeStage(cfg, own)
    stages = {"image_tokenizer": ImageTokenizerStage, "semantic_tokenizer": SemanticTokenizerStage, "pretrain": ModelStage, "sft": ModelStage, "edit_sft": EditStage}
    return stages[cfg.stage](cfg)


# ----------------------------------------------------------------------------- checkpoints


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


# ----------------------------------------------------------------------------- loop


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def process_batch(cfg: TrainConfig, position: int, rank: int, world: int, own: OwnData | None = None) -> list[dict]:
    """This process's contiguous slice of the global batch starting at `position` in the sample stream: the data
    engine's, or `own` data's (`cfg.data`), which is indexed by position the same way.

    Each sample carries its stream index, which keys its training noise (see `sample_generators`).
    """
    from ..shapeworld.dataset import t2i_samples

    per_rank = cfg.batch_size // world
    start = position + rank * per_rank
    if own is not None:
        return [{**own.sample(index, cfg.seed), "index": index} for index in range(start, start + per_rank)]
    if cfg.stage == "edit_sft":
        return [mixed_sample(cfg, index) for index in range(start, start + per_rank)]
    stream = t2i_samples(cfg.seed, cfg.canvas, cfg.category_weights, cfg.paraphrase_probability, start=start)
    return [{**s, "index": start + i} for i, s in enumerate(islice(stream, per_rank))]


def open_own_data(cfg: TrainConfig) -> OwnData | None:
    """The shards `cfg.data` names (None without); edit pairs count only for edit_sft."""
    from .own_data import OwnData

    return OwnData(cfg.data, cfg.canvas, edits=cfg.stage == "edit_sft") if cfg.data else None


def is_edit_position(index: int, edit_fraction: float) -> bool:
    """Spreads edits evenly over the stream (0.75: three of every four positions), so every batch slice mixes both."""
    return math.floor((index + 1) * edit_fraction) > math.floor(index * edit_fraction)


def mixed_sample(cfg: TrainConfig, index: int) -> dict:
    """Sample `index` of the edit SFT stream: an edit pair (source as "reference", target as "image" and its scene as
    "scene", the instruction as "caption") or a t2i sample, each drawn from its own seeded stream at that position."""
    from ..shapeworld.dataset import edit_samples, t2i_samples

    if is_edit_position(index, cfg.edit_fraction):
        s = next(edit_samples(cfg.seed, cfg.canvas, cfg.edit_category_weights, cfg.paraphrase_probability, start=index, placement=cfg.edit_placement))
        return {**s, "image": s["target"], "scene": s["target_scene"], "reference": s["source"], "caption": s["instruction"],
                "prompt": s["instruction"], "index": index}
    return {**next(t2i_samples(cfg.seed, cfg.canvas, cfg.category_weights, cfg.paraphrase_probability, start=index)), "index": index}


def sample_generators(cfg: TrainConfig, samples: list[dict]) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, stream index): noise and condition dropout then depend on
    neither the process count nor the resume point."""
    seeds = [int(np.random.SeedSequence([cfg.seed, 1, s["index"]]).generate_state(1)[0]) for s in samples]
    return [torch.Generator().manual_seed(seed) for seed in seeds]


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


def prune_checkpoints(out: Path, keep: int) -> None:
    found = sorted(p for p in out.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir())
    for old in found[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


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


class MetricsLog:
    """metrics.csv and TensorBoard scalars (main process only), and a PNG of the loss curves."""

    def __init__(self, out: Path, enabled: bool):
        self.out, self.enabled = out, enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))

    def add(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        path = self.out / "metrics.csv"
        rows = self._rows()
        rows = [r for r in rows if int(r["step"]) < step] + [{"step": step, **values}]  # a resumed run rewrites its tail
        keys = ["step"] + sorted({k for r in rows for k in r} - {"step"})
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def _rows(self) -> list[dict]:
        path = self.out / "metrics.csv"
        if not path.is_file():
            return []
        with open(path) as f:
            return list(csv.DictReader(f))

    def plot(self, filename: str = "loss_curves.png", keys: list[str] | None = None, log_scale: bool = True, title: str = "training losses") -> None:
        """A PNG of the logged `keys` over steps (default: every column but lr and throughput)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self._rows()
        if not rows:
            return
        keys = keys or [k for k in rows[0] if k not in ("step", "lr", "samples_per_s")]
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [int(r["step"]) for r in rows]
        for k in keys:
            ax.plot(steps, [float(r[k]) if r.get(k) not in (None, "") else float("nan") for r in rows], label=k)
        ax.set_xlabel("step")
        if log_scale:
            ax.set_yscale("log")
        ax.legend()
        ax.set_title(title)
        fig.tight_layout()
        fig.savefig(self.out / filename, dpi=100)
        plt.close(fig)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
