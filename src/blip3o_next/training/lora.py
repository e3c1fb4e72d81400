"""LoRA adapters on the AR model and the diffusion transformer, with `peft`.

peft injects the LoRA layers into the parts themselves (`model.ar` stays a Qwen3ForCausalLM, `model.transformer`
a SanaTransformer2DModel), so the model's forward, the sampler and the trainer run unchanged; the `PeftModel`
handles that `add_adapters` / `load_adapters` return (one per part) save the adapters with peft's `save_pretrained`
(`adapter_config.json` + `adapter_model.safetensors`, one folder per part) and merge them with `merge_and_unload`,
after which the model saves and loads as any other:

    model = apply_adapters(Blip3oNext.from_pretrained("runs/base"), "runs/lora/final/adapters")
    model.save_pretrained("runs/merged")
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peft import LoraConfig, PeftModel, get_peft_model, load_peft_weights, set_peft_model_state_dict

if TYPE_CHECKING:
    from ..models.modeling import Blip3oNext

Adapters = dict[str, PeftModel]  # by part name: peft's handle on the adapters injected into that part

# The parts LoRA can adapt, and the Linear layers it adapts by default: Qwen3's attention and MLP projections;
# SANA's self- (attn1) and cross-attention (attn2) projections.
DEFAULT_TARGETS: dict[str, list[str]] = {
    "ar": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "transformer": ["to_q", "to_k", "to_v", "to_out.0"],
}


@dataclass
class LoraSettings:
    """LoRA on some parts of the model: only the adapters train, every base weight stays frozen."""

    rank: int = 8  # r: the adapters' inner width
    alpha: float = 16.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapters' input
    parts: list[str] = field(default_factory=lambda: ["ar", "transformer"])  # of DEFAULT_TARGETS
    target_modules: dict[str, list[str]] = field(default_factory=dict)  # per part: module names (suffixes) instead of the defaults

    def __post_init__(self):
        for part in [*self.parts, *self.target_modules]:
            if part not in DEFAULT_TARGETS:
                raise ValueError(f"lora: unknown part {part!r} (LoRA adapts {', '.join(DEFAULT_TARGETS)})")
        if set(self.target_modules) - set(self.parts):
            raise ValueError(f"lora.target_modules names {', '.join(sorted(set(self.target_modules) - set(self.parts)))}, not in lora.parts")
        if not self.parts or len(set(self.parts)) < len(self.parts):
            raise ValueError(f"lora.parts must name each part to adapt once, got {self.parts}")
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoraSettings:
        """From a config mapping; unknown keys raise a ValueError naming them (a typo would silently do nothing)."""
        if not isinstance(data, dict):
            raise TypeError(f"lora must be a mapping of settings (rank, alpha, dropout, parts, target_modules), got {data!r}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"lora: unknown setting(s) {', '.join(sorted(unknown))}")
        return cls(**data)

    def peft_config(self, part: str) -> LoraConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=self.target_modules.get(part, DEFAULT_TARGETS[part]))


def add_adapters(model: Blip3oNext, settings: LoraSettings) -> Adapters:
    """Give `settings.parts` new LoRA adapters (B starts at zero, so the model computes what it did) and freeze
    every other parameter of the model. A target name that matches no layer of its part raises a ValueError."""
    model.requires_grad_(False)
    adapters = {}
    for name in settings.parts:
        part = getattr(model, name)
        if part is None:
            raise ValueError(f"lora.parts: this model has no {name}")
        config = settings.peft_config(name)
        adapters[name] = get_peft_model(part, config)
        for target in config.target_modules:
            if not any(m == target or m.endswith(f".{target}") for m in adapters[name].targeted_module_names):
                raise ValueError(f"lora.target_modules: {target!r} matches no layer of {name}")
    return adapters


def save_adapters(adapters: Adapters, folder: str | os.PathLike) -> None:
    """Each part's adapters in `folder/<part>/`, with peft's `save_pretrained` (safetensors + JSON)."""
    for name, wrapped in adapters.items():
        wrapped.save_pretrained(str(Path(folder) / name))


def load_adapters(model: Blip3oNext, folder: str | os.PathLike, trainable: bool = False) -> Adapters:
    """Put the adapters saved in `folder/<part>/` (by `save_adapters`) on the model's parts."""
    folders = sorted(p for p in Path(folder).iterdir() if (p / "adapter_config.json").is_file()) if Path(folder).is_dir() else []
    if not folders:
        raise ValueError(f"{folder}: no adapters (expected <part>/adapter_config.json)")
    adapters = {}
    for sub in folders:
        if sub.name not in DEFAULT_TARGETS or getattr(model, sub.name) is None:
            raise ValueError(f"{sub}: adapters for {sub.name!r}, which this model has no LoRA-able part of")
        adapters[sub.name] = PeftModel.from_pretrained(getattr(model, sub.name), sub, is_trainable=trainable)
    return adapters


def restore_adapter_weights(adapters: Adapters, folder: str | os.PathLike) -> None:
    """Load saved adapter weights into existing adapters (resuming: the optimizer already holds these tensors)."""
    for name, wrapped in adapters.items():
        result = set_peft_model_state_dict(wrapped, load_peft_weights(str(Path(folder) / name)))
        if result.unexpected_keys:
            raise ValueError(f"{Path(folder) / name}: adapter weights that fit no adapter, e.g. {result.unexpected_keys[0]}")


def merge_adapters(model: Blip3oNext, adapters: Adapters) -> Blip3oNext:
    """Fold the adapters into their parts' base weights and drop them (peft's `merge_and_unload`), in place: the
    parts are plain Qwen3 / SANA models again, and `save_pretrained` writes a model that loads as any other."""
    for name, wrapped in adapters.items():
        setattr(model, name, wrapped.merge_and_unload())
    return model


def apply_adapters(model: Blip3oNext, folder: str | os.PathLike) -> Blip3oNext:
    """The model with the adapters saved in `folder` merged in (e.g. a LoRA run's `final/adapters`)."""
    return merge_adapters(model, load_adapters(model, folder))
