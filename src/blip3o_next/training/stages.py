"""The training stages: what each trains (image tokenizer, semantic tokenizer, VAE, the whole model for pretrain,
SFT and edit SFT, LoRA adapters), its loss on a batch of samples, how it saves and reloads its module, and its
sample grid. The loop that drives them is `trainer.py`."""

from __future__ import annotations

import dataclasses
import functools
import shutil
import tempfile
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import nn

from .config import TrainConfig

if TYPE_CHECKING:
    from .own_data import OwnData


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

        parts = cfg.parts.get("semantic_tokenizer", {})
        self.module = SemanticEncoder(image_size=cfg.canvas, **parts) if not cfg.init_from else self.fine_tuned(cfg.init_from, parts)

    @staticmethod
    def fine_tuned(init_from: str, parts: dict):
        """A trained encoder (its folder, or a model's: a bundled name or checkpoint folder) with `parts` changing its
        config; parts it lacks (a letter reader) start at their identity initialisation."""
        from ..models.semantic_encoder import SemanticEncoder
        from ..pipeline import resolve_model_path

        folder = Path(init_from)
        if not (folder / "config.json").is_file():
            folder = resolve_model_path(init_from) / "image_tokenizer"
        start = SemanticEncoder.from_pretrained(folder, torch_dtype=torch.float32, use_safetensors=True)
        config = {k: v for k, v in start.config.items() if not k.startswith("_")}
        may_change = () if config["letter_reader_layers"] else ("letter_reader_layers", "letter_reader_side")
        changed = sorted(k for k, v in parts.items() if config.get(k) != v and k not in may_change)
        if changed:
            raise ValueError(f"fine-tuning {folder} may only add a letter reader; parts.semantic_tokenizer changes {', '.join(changed)}")
        module = SemanticEncoder(**{**config, **parts})
        module.load_state_dict(start.state_dict(), strict=False)  # the letter reader's keys stay at their initialisation
        return module

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


LOSS_WEIGHTS = ("ce_weight", "flow_matching_weight", "edit_change_weight")  # Blip3oNextConfig's training-loss fields


class ModelStage(PretrainedModuleStage):
    """Pretrain / SFT of the AR model, connector and diffusion transformer; tokenizer and VAE frozen."""

    def __init__(self, cfg: TrainConfig):
        from diffusers import AutoencoderDC
        from transformers import PreTrainedTokenizerFast

        from ..models.modeling import Blip3oNext, Blip3oNextConfig, enable_glyphs, image_tokenizer_class
        from ..models.presets import build_model, tiny_parts_configs
        from ..models.semantic_encoder import SemanticEncoder

        self.cfg = cfg
        # The glyph condition widens the transformer (enable_glyphs) rather than being a plain setting.
        overrides = {k: v for k, v in cfg.model.items() if k != "glyph_condition"}
        if cfg.stage in ("sft", "edit_sft"):
            from ..pipeline import resolve_model_path

            model = Blip3oNext.from_pretrained(resolve_model_path(cfg.init_from), torch_dtype=torch.float32)
            # The loss weights are this stage's, not those of the stage that made the start model (stage 5c trains
            # with flow matching off): unless `model:` sets them, they are the defaults.
            defaults = Blip3oNextConfig()
            losses = {name: getattr(defaults, name) for name in LOSS_WEIGHTS}
            model.config = dataclasses.replace(model.config, **{**losses, **overrides})
        else:
            tok = PreTrainedTokenizerFast.from_pretrained(cfg.text_tokenizer_dir)
            folder = Path(cfg.image_tokenizer_dir)
            image_tokenizer = image_tokenizer_class(folder).from_pretrained(folder, use_safetensors=True)
            vae = AutoencoderDC.from_pretrained(cfg.vae_dir, use_safetensors=True)
            semantic = isinstance(image_tokenizer, SemanticEncoder)
            configs = tiny_parts_configs(vocab_size=0, codebook_size=image_tokenizer.codebook_size, semantic=semantic)
            for name, override in cfg.parts.items():
                configs[name].update(override)
            model = build_model(tok, configs, Blip3oNextConfig(image_size=cfg.canvas, **overrides), image_tokenizer=image_tokenizer, vae=vae)
        if cfg.model.get("glyph_condition"):
            enable_glyphs(model)
        elif model.config.glyph_condition and "glyph_condition" in cfg.model:
            raise ValueError(f"{cfg.init_from} renders with the glyph condition; a stage cannot take it away (glyph_condition: false)")
        for part in (model.image_tokenizer, model.vae):
            part.requires_grad_(False).eval()
        self.module = model
        if cfg.reader:
            model.add_reader()

    def loss(self, model, samples, generators):
        """Samples with a "reference" image are edits (caption = instruction, image = target); the rest t2i."""
        from ..models.autoregressive import build_sequences
        from ..models.vae import encode_latents

        core = self.module
        core.image_tokenizer.eval()  # frozen: eval mode also stops the VQ codebook's EMA updates
        core.vae.eval()
        device = next(p for p in model.parameters() if p.requires_grad).device
        exact = core.semantic and all("scene" in s for s in samples)
        exact_references = self.cfg.edit_references == "exact"
        if exact_references and not exact:
            raise ValueError("edit_references: exact needs a semantic blueprint and the data engine's scenes")
        if exact:
            samples, codes, references = self.exact_blueprints(samples, with_references=exact_references)
            codes = codes.to(device)
        is_edit = torch.tensor(["reference" in s for s in samples], device=device)
        reference_codes, reference_latents = None, None
        renders = core.config.trains_renderer  # else the AR side alone learns: no latents are needed
        latents = None
        # The targets' pixels are read only to encode them: for latents, or for codes without a known scene.
        x = _images(samples).to(device) if renders or not exact else None
        with torch.no_grad():
            if not exact:  # VQ codes; or own data's semantic blueprints, as the model's own encoder reads its images
                codes = core.image_tokenizer.encode(x)
            if renders:
                latents = encode_latents(core.vae, x)
            if is_edit.any():  # only the edit rows' references are encoded; t2i rows keep placeholders the model never reads
                if renders or not exact_references:
                    r = _images([{"image": s["reference"]} for s in samples if "reference" in s]).to(device)
                if renders:
                    reference_latents = latents.clone()
                    reference_latents[is_edit] = encode_latents(core.vae, r)
                if exact_references:
                    reference_codes = references
                else:
                    edit_codes = iter(core.image_tokenizer.encode(r).tolist())
                    reference_codes = [next(edit_codes) if e else None for e in is_edit.tolist()]
        ids, mask, labels = build_sequences(
            core.tokenizer, core.image_vocab, [s["caption"] for s in samples], codes, self.cfg.max_prompt_tokens, reference_codes
        )
        out = model(ids.to(device), mask.to(device), labels.to(device), latents, generators, reference_latents, is_edit if is_edit.any() else None)
        return out.loss, {"ce": out.ce_loss.item(), "flow_matching": out.flow_matching_loss.item()}

    @staticmethod
    def exact_blueprints(samples: list[dict], with_references: bool = False) -> tuple[list[dict], torch.Tensor, list[list[int] | None]]:
        """A semantic blueprint's training targets: the exact blueprints of the samples' scenes (the data engine
        knows them; `loss` lets the encoder read images without a scene, such as own data's), and `with_references`
        also each edit pair's source blueprint (None for the rest). Samples the codec cannot write are skipped (about 1
        in 20,000 scenes: a one-letter word beside a small shape, both anchored in one cell)."""
        from ..models.semantic_blueprint import encode_scene
        from ..shapeworld.world import Scene

        kept, codes, references = [], [], []
        for s in samples:
            try:
                code = encode_scene(Scene.from_dict(s["scene"]))
                reference = encode_scene(Scene.from_dict(s["source_scene"])) if with_references and "reference" in s else None
            except ValueError:
                continue
            kept.append(s)
            codes.append(code)
            references.append(reference)
        return kept, torch.tensor(codes), references

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
