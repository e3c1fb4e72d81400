"""BLIP3o-NEXT as one model object: the AR model writes the blueprint, the connector maps its hidden states over
the image span to the diffusion transformer's conditioning, which renders VAE latents.

One class serves training (forward returns CE + flow-matching losses) and inference (the pipeline calls the
sampler functions on its parts). Parts are standard classes, saved one per subfolder in their own Hugging Face
format, so the same code loads the tiny preset and, given local checkpoints, the real next-3b parts (the presets
themselves are `presets.py`).

Over 400 lines on purpose: the config, the class and its save/load are one object read top to bottom, as nanoGPT's
model.py; the helpers below it serve that class alone.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from safetensors import SafetensorError
from torch import nn
from transformers import PreTrainedTokenizerFast, Qwen3ForCausalLM

from .autoregressive import ar_hidden_states
from .connector import Connector
from .diffusion import TIMESTEP_SAMPLINGS, Condition, drop_condition, flow_matching_loss
from .image_tokenizer import ImageTokenizer
from .semantic_blueprint import glyph_ink, object_boxes
from .semantic_embedding import SemanticEmbedding, token_log_probs
from .semantic_encoder import SemanticEncoder
from .ta_tok import TATok
from .text_tokenizer import ImageVocab
from .vae import spatial_compression

logger = logging.getLogger(__name__)

CONFIG_NAME = "blip3o_config.json"
SUBFOLDERS = ("tokenizer", "image_tokenizer", "ar", "connector", "transformer", "vae", "scheduler")
# image_embedding: only with a semantic blueprint; reference_connector and edit_ar only in models trained to edit;
# reader_ar (and with a semantic blueprint reader_embedding) only in models tuned by GRPO with a reader.
OPTIONAL_SUBFOLDERS = ("image_embedding", "reference_connector", "edit_ar", "reader_ar", "reader_embedding")
IMAGE_TOKENIZERS = {cls.__name__: cls for cls in (ImageTokenizer, SemanticEncoder, TATok)}


CONDITION_SOURCES = ("blueprint", "prompt")
INJECTION_AXES = ("width", "channels")


class CheckpointError(ValueError):
    """A checkpoint folder is incomplete or does not fit the model (names the file or tensor)."""


@dataclass
class Blip3oNextConfig:
    """Settings of the whole model that belong to no single part."""

    image_size: int = 64  # px of generated images
    ce_weight: float = 1.0  # loss = ce_weight * CE + flow_matching_weight * FM (official 1:1)
    flow_matching_weight: float = 1.0
    # Edit SFT: weight of the CE on answer tokens that differ from the reference's token in the same slot (the edit
    # itself); the copied tokens weigh 1. An edit changes 1-5 of 69 tokens, so at weight 1 copying dominates the loss.
    edit_change_weight: float = 1.0
    condition_dropout: float = 0.1  # share of samples whose AR condition is zeroed (for CFG)
    timestep_sampling: str = "uniform"  # flow matching's training noise levels: "uniform" or "logit_normal" (diffusion.py)
    num_inference_steps: int = 30  # official defaults at inference; 6 in `tiny` (docs/semantic_blueprint.md, "Speed")
    guidance_scale: float = 2.0
    top_k: int = 1200
    top_p: float = 0.95
    temperature: float = 1.0
    # Semantic blueprints: the temperature of a token's id within its kind, drawn after the kind at `temperature`
    # (`autoregressive.kind_first_sample`; None: one draw over all ids). 0.5 in `tiny`: on prompts the evaluation
    # never sees, its plans spell 0.71 of words right against 0.60 with one draw (docs/semantic_blueprint.md, "Sampling").
    id_temperature: float | None = None
    # Blueprints sampled per image, of which the AR model's most likely is rendered (`SamplingConfig.best_of`; greedy
    # edits write one). 8 in `tiny`: GenEval-ShapeWorld 0.933 -> 0.950, position 0.720 -> 0.787, for 1.4x the AR
    # model's time (docs/semantic_blueprint.md, "Best of N").
    best_of: int = 1
    # What the diffusion model cross-attends to: "blueprint" (the AR hidden states over <S0> and the image
    # tokens, as in BLIP3o-NEXT) or "prompt" (the hidden states over the prompt only: the no-blueprint ablation).
    condition_source: str = "blueprint"
    # Editing (docs/design.md#official-editing): the reference image enters the AR model as image tokens before the instruction's
    # answer, and the diffusion model through its VAE latents, as cross-attention tokens and/or by noise-space
    # injection. `editing` is set by the edit SFT stage; the two switches choose the latent paths.
    editing: bool = False
    reference_cross_attention: bool = True
    reference_noise_injection: bool = True
    # "width": [noisy | reference] side by side, the output's reference half discarded (official). "channels": the
    # reference latents as extra input channels (the tiny preset; SANA's linear self-attention did not learn the
    # half-width copy within the CPU budget, see docs/editing.md).
    reference_injection_axis: str = "width"
    # Edits get their own copy of the AR model (`edit_ar`), trained by edit SFT, while text to image keeps the
    # starting AR model frozen, so editing cannot cost generation quality. With one shared AR model, edit SFT cost
    # the tiny model 0.10 GenEval, all of it through the AR model (docs/editing.md). Costs one more AR's weights.
    separate_edit_ar: bool = False
    # Inference default for edits (blended latent diffusion): the blueprint cells an edit leaves unchanged (the
    # same token as the reference's) keep the reference's latents during sampling, so only what the AR model changed
    # is redrawn. Off in the official design.
    edit_preserve_unchanged: bool = False
    # With preservation, also put the reference's own pixels back in those cells after decoding (the overlay of
    # diffusers' inpainting pipelines), so they do not carry the VAE's reconstruction error.
    edit_paste_unchanged: bool = False
    # AR sampling temperature for edits (None: `temperature`). An edit's blueprint should copy most of the
    # reference's tokens, which a cooler sampler does more often than the text-to-image default.
    edit_temperature: float | None = None
    # Glyph condition (semantic blueprint only): the ink of the blueprint's word, its letters laid out by the font
    # (`semantic_blueprint.glyph_ink`), pixel-unshuffled to the latent grid as extra input channels of the
    # transformer, as text-rendering diffusion models condition on rendered glyphs (GlyphControl, TextDiffuser,
    # AnyText). Derived from the tokens the AR model wrote, never from the prompt. Without it the tiny renderer drew
    # no legible letter even from true blueprints (text 0.10). Not in the official design. Set by `enable_glyphs`.
    glyph_condition: bool = False
    extra: dict = field(default_factory=dict)  # free-form notes (e.g. the preset name)

    @property
    def trains_renderer(self) -> bool:
        """Whether training renders (flow matching); with its weight 0 the AR side alone learns, on CE."""
        return self.flow_matching_weight > 0

    def __post_init__(self):
        if not 0 <= self.condition_dropout < 1:
            raise ValueError(f"condition_dropout must be in [0, 1), got {self.condition_dropout}")
        if self.ce_weight < 0 or self.flow_matching_weight < 0:
            raise ValueError("loss weights must be non-negative")
        if self.edit_change_weight < 1:
            raise ValueError(f"edit_change_weight must be >= 1, got {self.edit_change_weight}")
        if self.condition_source not in CONDITION_SOURCES:
            raise ValueError(f"condition_source must be one of {', '.join(CONDITION_SOURCES)}, got {self.condition_source!r}")
        if self.editing and self.condition_source != "blueprint":
            raise ValueError("editing needs condition_source 'blueprint'")
        for name in ("edit_temperature", "id_temperature"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.best_of < 1:
            raise ValueError(f"best_of must be >= 1, got {self.best_of}")
        if self.timestep_sampling not in TIMESTEP_SAMPLINGS:
            raise ValueError(f"timestep_sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {self.timestep_sampling!r}")
        if self.reference_injection_axis not in INJECTION_AXES:
            raise ValueError(f"reference_injection_axis must be one of {', '.join(INJECTION_AXES)}, got {self.reference_injection_axis!r}")


@dataclass
class Blip3oNextOutput:
    loss: torch.Tensor
    ce_loss: torch.Tensor
    flow_matching_loss: torch.Tensor


class Blip3oNext(nn.Module):
    """The parts, registered by name, and the joint training objective."""

    def __init__(
        self,
        config: Blip3oNextConfig,
        tokenizer: PreTrainedTokenizerFast,
        image_tokenizer: ImageTokenizer | SemanticEncoder | TATok,
        ar: Qwen3ForCausalLM,
        connector: Connector,
        transformer: SanaTransformer2DModel,
        vae: AutoencoderDC,
        scheduler: FlowMatchEulerDiscreteScheduler,
        image_embedding: SemanticEmbedding | None = None,
        reference_connector: Connector | None = None,
        edit_ar: Qwen3ForCausalLM | None = None,
        reader_ar: Qwen3ForCausalLM | None = None,
        reader_embedding: SemanticEmbedding | None = None,
    ):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.image_tokenizer = image_tokenizer
        self.ar = ar
        self.connector = connector
        self.transformer = transformer
        self.vae = vae
        self.scheduler = scheduler
        self.image_embedding = image_embedding
        self.reference_connector = reference_connector
        self.edit_ar = edit_ar
        # The reader: a frozen copy of the AR side the renderer was trained with. It re-reads each written blueprint
        # in one teacher-forced pass, and its hidden states condition the renderer, so that RL can move the writer
        # (`ar`, `image_embedding`) without moving the renderer's input (`reader_states`).
        self.reader_ar = reader_ar
        self.reader_embedding = reader_embedding
        self.image_vocab = ImageVocab.from_tokenizer(tokenizer, image_tokenizer.codebook_size)
        self._check_parts()

    # ------------------------------------------------------------------ derived sizes

    @property
    def num_image_tokens(self) -> int:
        return self.image_tokenizer.num_tokens

    @property
    def semantic(self) -> bool:
        """Whether the blueprint is semantic (one token per object; `semantic_blueprint.py`) rather than VQ codes."""
        return isinstance(self.image_tokenizer, SemanticEncoder)

    @property
    def span_length(self) -> int:
        """Positions that condition the diffusion model: the scale token and the image tokens."""
        return 1 + self.num_image_tokens

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.config.image_size // spatial_compression(self.vae)
        return (self.vae.config.latent_channels, side, side)

    @property
    def reference_input_channels(self) -> int:
        """Input channels the transformer gives an edit's reference latents (channel-axis injection only)."""
        cfg = self.config
        channels = cfg.editing and cfg.reference_noise_injection and cfg.reference_injection_axis == "channels"
        return self.vae.config.latent_channels if channels else 0

    @property
    def glyph_input_channels(self) -> int:
        """Input channels the glyph condition adds to the transformer's (one per pixel of a latent cell)."""
        return spatial_compression(self.vae) ** 2 if self.config.glyph_condition else 0

    def ar_for(self, edits: bool) -> Qwen3ForCausalLM:
        """The AR model that writes blueprints for edits (`edits` True) or for text to image."""
        return self.edit_ar if edits and self.edit_ar is not None else self.ar

    def add_reader(self) -> None:
        """Freeze a copy of the current AR side (`ar`, `image_embedding`) as the reader the renderer reads through
        from now on; a model that already has one keeps it (the renderer was trained on that one's states)."""
        if self.reader_ar is None:
            self.reader_ar = copy.deepcopy(self.ar).requires_grad_(False)
            self.reader_embedding = None if self.image_embedding is None else copy.deepcopy(self.image_embedding).requires_grad_(False)
            self._check_parts()

    def reader_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The reader's last-layer hidden states (B, T, H) over whole sequences (prompt and blueprint)."""
        return ar_hidden_states(self.reader_ar, input_ids, attention_mask, self.image_vocab, self.reader_embedding)

    def _check_parts(self) -> None:
        """Fail loudly, showing both numbers, when the parts do not fit together."""
        # With a semantic blueprint the AR model's table holds the text rows, and image_embedding the image rows.
        ar_rows = self.image_vocab.image_offset if self.semantic else self.image_vocab.vocab_end
        checks = [
            ("AR vocabulary", self.ar.config.vocab_size, ">=", ar_rows),
            ("connector input", self.connector.config.hidden_size, "==", self.ar.config.hidden_size),
            ("connector width", self.connector.config.width, "==", self.transformer.config.caption_channels),
            ("transformer in_channels", self.transformer.config.in_channels, "==",
             self.vae.config.latent_channels + self.connector.map_channels + self.glyph_input_channels + self.reference_input_channels),
            ("image tokenizer input", self.image_tokenizer.config.image_size, "==", self.config.image_size),
        ]
        if self.semantic != (self.image_embedding is not None):
            raise ValueError(f"a {'semantic' if self.semantic else 'VQ'} blueprint {'needs' if self.semantic else 'has no'} image_embedding")
        if self.image_embedding is not None:
            checks += [("image_embedding width", self.image_embedding.config.hidden_size, "==", self.ar.config.hidden_size),
                       ("image_embedding ids", self.image_embedding.vocab.size, "==", self.image_vocab.codebook_size)]
        if self.config.glyph_condition and not self.semantic:
            raise ValueError("the glyph condition reads the word from a semantic blueprint; this model's is VQ")
        if self.connector.config.footprint_channels and not self.semantic:
            raise ValueError("the connector's footprint path reads object boxes from a semantic blueprint; this model's is VQ")
        if self.edit_ar is not None:
            checks += [("edit_ar hidden size", self.edit_ar.config.hidden_size, "==", self.ar.config.hidden_size),
                       ("edit_ar vocabulary", self.edit_ar.config.vocab_size, "==", self.ar.config.vocab_size)]
        if self.reader_ar is not None:
            checks += [("reader_ar hidden size", self.reader_ar.config.hidden_size, "==", self.ar.config.hidden_size),
                       ("reader_ar vocabulary", self.reader_ar.config.vocab_size, "==", self.ar.config.vocab_size)]
            if self.edit_ar is not None:
                raise ValueError("a reader re-reads what `ar` writes; a model with a separate edit_ar has no reader")
            if (self.reader_embedding is not None) != self.semantic:
                raise ValueError(f"the reader of a {'semantic' if self.semantic else 'VQ'} blueprint {'needs' if self.semantic else 'has no'} reader_embedding")
        elif self.reader_embedding is not None:
            raise ValueError("reader_embedding comes with reader_ar")
        for name, got, op, want in checks:
            if (op == "==" and got != want) or (op == ">=" and got < want):
                raise ValueError(f"{name} is {got}, must be {op} {want}")
        if self.config.condition_source == "prompt" and self.connector.map_channels:
            raise ValueError("the connector's spatial maps need the blueprint; condition_source 'prompt' needs spatial_channels = footprint_channels = 0")
        if self.config.separate_edit_ar and self.semantic:
            raise ValueError("separate_edit_ar is for VQ blueprints; a semantic blueprint edits with its one AR model")
        if self.config.separate_edit_ar and not self.config.editing:
            raise ValueError("separate_edit_ar needs editing")
        if self.config.separate_edit_ar != (self.edit_ar is not None):
            raise ValueError(f"separate_edit_ar is {self.config.separate_edit_ar} but the model {'has' if self.edit_ar else 'has no'} edit_ar")
        if self.config.editing and self.config.reference_cross_attention:
            ref = self.reference_connector
            if ref is None:
                raise ValueError("reference_cross_attention needs a reference_connector (see enable_editing)")
            if ref.config.hidden_size != self.vae.config.latent_channels or ref.config.width != self.transformer.config.caption_channels:
                raise ValueError(
                    f"reference connector maps {ref.config.hidden_size} -> {ref.config.width}, must map the VAE's "
                    f"{self.vae.config.latent_channels} latent channels -> {self.transformer.config.caption_channels}"
                )

    # ------------------------------------------------------------------ training

    def image_span(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Index (B, span_length) of the last <S0> and the image tokens after it in each sequence (the image to
        render; an edit's reference image comes before it)."""
        is_scale = input_ids == self.image_vocab.scales[0]
        if not torch.all(is_scale.any(1)):
            raise ValueError(f"each sequence needs an <S0> token; found {is_scale.sum(1).tolist()}")
        start = input_ids.shape[1] - 1 - is_scale.flip(1).float().argmax(1, keepdim=True)
        index = start + torch.arange(self.span_length, device=input_ids.device)
        if int(index.max()) >= input_ids.shape[1]:
            raise ValueError(f"the image span needs {self.span_length} positions after <S0>; the sequence is too short")
        tokens = input_ids.gather(1, index[:, 1:])
        n_image = ((tokens >= self.image_vocab.image_offset) & (tokens < self.image_vocab.vocab_end)).sum(1)
        if not torch.all(n_image == self.num_image_tokens):
            raise ValueError(f"image spans hold {n_image.tolist()} image tokens, expected {self.num_image_tokens}")
        return index

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        latents: torch.Tensor | None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        reference_latents: torch.Tensor | None = None,
        is_edit: torch.Tensor | None = None,
    ) -> Blip3oNextOutput:
        """Joint loss: next-token CE over text and image tokens + flow matching conditioned on the image span.

        For edit samples (`is_edit` (B,) True), `reference_latents` (B, C, H, W) are the source image's latents;
        the other samples of the batch are text-to-image and are rendered without a reference. With
        `flow_matching_weight` 0 the loss is the CE alone and `latents` may be None."""
        hidden, token_log_p = self._ar_forward(input_ids, attention_mask, labels[:, 1:], is_edit)
        index = self.image_span(input_ids)
        valid = (labels[:, 1:] != -100).float() * self.ce_token_weights(input_ids, index, is_edit)
        # Mean per sequence, then over the batch: the same loss however the batch is split across processes.
        ce = (-(token_log_p * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()
        if not self.config.trains_renderer:  # the AR side alone learns (e.g. to plan edits): nothing is rendered
            return Blip3oNextOutput(loss=self.config.ce_weight * ce, ce_loss=ce.detach(), flow_matching_loss=torch.zeros((), device=ce.device))
        if self.reader_ar is not None:  # the renderer reads the blueprint through the reader (see __init__)
            hidden = self.reader_states(input_ids, attention_mask)
        if self.config.condition_source == "prompt":
            condition = self.condition(*prompt_states(hidden, attention_mask, index[:, 0] - 1))
        else:
            codes = input_ids.gather(1, index[:, 1:]) - self.image_vocab.image_offset
            condition = self.condition(hidden.gather(1, index[..., None].expand(-1, -1, hidden.shape[-1])), codes=codes)
        condition = drop_condition(condition, self.config.condition_dropout if self.training else 0.0, generator)
        fm = self._flow_matching_loss(latents, condition, generator, reference_latents, is_edit)
        loss = self.config.ce_weight * ce + self.config.flow_matching_weight * fm
        return Blip3oNextOutput(loss=loss, ce_loss=ce.detach(), flow_matching_loss=fm.detach())

    def ce_token_weights(self, input_ids: torch.Tensor, index: torch.Tensor, is_edit: torch.Tensor | None) -> torch.Tensor:
        """Per-target CE weights (B, T - 1): `edit_change_weight` on an edit's answer tokens that differ from the
        reference's token in the same slot (the reference is the image span after the first <S0>), else 1."""
        weights = torch.ones(input_ids.shape[0], input_ids.shape[1] - 1, device=input_ids.device)
        if is_edit is None or self.config.edit_change_weight == 1 or not is_edit.any():
            return weights
        first = (input_ids == self.image_vocab.scales[0]).float().argmax(1, keepdim=True)
        reference = input_ids.gather(1, first + torch.arange(1, self.span_length, device=input_ids.device))
        answer = input_ids.gather(1, index[:, 1:])
        changed = (answer != reference) & is_edit[:, None]
        return weights.scatter(1, index[:, 1:] - 1, torch.where(changed, self.config.edit_change_weight, 1.0))

    def _ar_forward(self, input_ids, attention_mask, targets, is_edit=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Last-layer hidden states (B, T, H) and the log-probability of each next token `targets` (B, T - 1; 0
        where -100). With a separate edit AR model, edit rows go through it and the other rows through the
        text-to-image one."""
        groups = [(self.ar, None)]
        if self.edit_ar is not None and is_edit is not None:
            groups = [(self.ar, ~is_edit), (self.edit_ar, is_edit)]
        hidden = log_p = None
        for ar, rows in groups:
            ids, mask, tg = (input_ids, attention_mask, targets) if rows is None else (input_ids[rows], attention_mask[rows], targets[rows])
            if ids.shape[0] == 0:
                continue
            h = ar_hidden_states(ar, ids, mask, self.image_vocab, self.image_embedding)
            lp = self._token_log_probs(ar, h[:, :-1], tg, ids)
            if rows is None:
                return h, lp
            if hidden is None:
                hidden = h.new_zeros(input_ids.shape[0], *h.shape[1:])
                log_p = lp.new_zeros(input_ids.shape[0], *lp.shape[1:])
            hidden, log_p = hidden.index_put((rows,), h), log_p.index_put((rows,), lp)
        return hidden, log_p

    def _token_log_probs(self, ar: Qwen3ForCausalLM, hidden: torch.Tensor, targets: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """log p of `targets` (B, T - 1) from the states before them; 0 where the target is -100."""
        if self.image_embedding is not None:
            return token_log_probs(ar, self.image_embedding, hidden, targets, input_ids, self.image_vocab)
        log_p = ar.lm_head(hidden).float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
        return log_p * (targets != -100)

    def _flow_matching_loss(self, latents, condition, generator, reference_latents=None, is_edit=None) -> torch.Tensor:
        """Flow matching over the batch; with edit samples, text-to-image and edit samples go through the
        transformer as two groups (edits have the reference attached), and the loss is their sample-weighted mean."""
        num_train_timesteps = self.scheduler.config.num_train_timesteps
        if reference_latents is None or is_edit is None:
            return flow_matching_loss(self.transformer, latents, condition, num_train_timesteps, generator, self.config.timestep_sampling)
        total = latents.new_zeros((), dtype=torch.float32)
        for edits in (False, True):
            index = (is_edit == edits).nonzero().squeeze(1)
            if index.numel() == 0:
                continue
            group = condition.select(index)
            if edits:
                group = self.with_reference(group, reference_latents[index])
            gens = [generator[i] for i in index.tolist()] if isinstance(generator, list) else generator
            total = total + flow_matching_loss(self.transformer, latents[index], group, num_train_timesteps, gens, self.config.timestep_sampling) * index.numel()
        return total / latents.shape[0]

    def with_reference(self, condition: Condition, reference_latents: torch.Tensor) -> Condition:
        """Attach an edit's reference latents (B, C, H, W) by the paths this model was trained with."""
        if not self.config.editing:
            raise ValueError("this model was not trained to edit (its config has editing = false)")
        tokens = None
        if self.config.reference_cross_attention:
            tokens = self.reference_connector(reference_latents.flatten(2).transpose(1, 2).to(condition.tokens.dtype))
        inject = self.config.reference_noise_injection
        axis = self.config.reference_injection_axis
        return dataclasses.replace(
            condition,
            reference=reference_latents if inject and axis == "width" else None,
            reference_channels=reference_latents if inject and axis == "channels" else None,
            reference_tokens=tokens,
        )

    def condition(self, states: torch.Tensor, mask: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> Condition:
        """The diffusion condition from AR hidden states: the image span (B, span_length, H), or with
        condition_source "prompt" the prompt's states and their mask. A semantic blueprint's `codes` (B, N) place
        its objects' footprints. No reference image yet (`with_reference`)."""
        maps = []
        side = self.latent_shape[-1]
        image_states = states[:, 1:]  # the image tokens, not <S0>
        if self.connector.config.spatial_channels:
            # A semantic blueprint's grid cells follow its background token; VQ codes are all grid cells.
            cells = image_states[:, 1 : 1 + self.image_embedding.vocab.config.n_cells] if self.semantic else image_states
            maps.append(self.connector.spatial_map(cells, side))
        if self.connector.config.footprint_channels:
            if codes is None:
                raise ValueError("the footprint map needs the blueprint's codes (condition(..., codes=))")
            boxes, valid = footprint_boxes(codes, self.image_embedding.vocab)
            maps.append(self.connector.footprint_map(image_states, boxes.to(states.device, states.dtype), valid.to(states.device), side, self.config.image_size))
        if self.config.glyph_condition:
            if codes is None:
                raise ValueError("the glyph condition needs the blueprint's codes (condition(..., codes=))")
            maps.append(glyph_maps(codes, self.image_embedding.vocab, spatial_compression(self.vae)).to(states.device, states.dtype))
        spatial = torch.cat(maps, dim=1) if maps else None
        reference_channels = None
        if self.reference_input_channels:  # text-to-image in a model with channel injection: an all-zero reference
            reference_channels = states.new_zeros(states.shape[0], *self.latent_shape)
        return Condition(self.connector(states), mask, spatial, reference_channels=reference_channels)

    # ------------------------------------------------------------------ save / load

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """One subfolder per part plus blip3o_config.json, written to a temporary folder and renamed into place."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            for name in ("image_tokenizer", "ar", "connector", "transformer", "vae", "scheduler", *OPTIONAL_SUBFOLDERS):
                if getattr(self, name) is not None:
                    getattr(self, name).save_pretrained(tmp / name)
            (tmp / CONFIG_NAME).write_text(json.dumps(asdict(self.config), indent=2) + "\n")
            if path.exists():
                shutil.rmtree(path)
            tmp.rename(path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None, use_safetensors: bool = True) -> "Blip3oNext":
        """Load every part from its subfolder, safetensors only (`use_safetensors` exists for the diffusers /
        transformers signature and cannot be turned off); errors name the file or the tensor that does not fit."""
        if not use_safetensors:
            raise ValueError("BLIP3o-NEXT checkpoints load from safetensors only; pickle weights are never loaded")
        path = Path(path)
        config = read_config(path)
        for sub in SUBFOLDERS:
            if not (path / sub).is_dir():
                raise CheckpointError(f"{path / sub}: missing part folder")
        refuse_pickled_weights(path)
        dtype = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        weights = {"use_safetensors": True}  # never fall back to a pickled *.bin, even one the scan above missed

        def load_ar(p: Path) -> Qwen3ForCausalLM:
            return Qwen3ForCausalLM.from_pretrained(p, **weights, **({"dtype": torch_dtype} if torch_dtype else {}))

        loaders = {
            "tokenizer": lambda p: PreTrainedTokenizerFast.from_pretrained(p),
            "image_tokenizer": lambda p: image_tokenizer_class(p).from_pretrained(p, **weights, **dtype),
            "image_embedding": lambda p: SemanticEmbedding.from_pretrained(p, **weights, **dtype),
            "ar": load_ar,
            "connector": lambda p: Connector.from_pretrained(p, **weights, **dtype),
            "transformer": lambda p: SanaTransformer2DModel.from_pretrained(p, **weights, **dtype),
            "vae": lambda p: AutoencoderDC.from_pretrained(p, **weights, **dtype),
            "scheduler": lambda p: FlowMatchEulerDiscreteScheduler.from_pretrained(p),
            "reference_connector": lambda p: Connector.from_pretrained(p, **weights, **dtype),
            "edit_ar": load_ar,
            "reader_ar": load_ar,
            "reader_embedding": lambda p: SemanticEmbedding.from_pretrained(p, **weights, **dtype),
        }
        parts = {}
        for name, load in loaders.items():
            if name in OPTIONAL_SUBFOLDERS and not (path / name).is_dir():
                continue
            try:
                parts[name] = load(path / name)
            except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
                raise CheckpointError(f"{_culprit(path / name, e)}: {str(e).strip().splitlines()[0]}") from None
        try:
            model = cls(config, **parts)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None
        return model.eval()


@torch.no_grad()
def widen_input(transformer: SanaTransformer2DModel, extra: int, at: int | None = None) -> None:
    """Give the transformer `extra` more input channels, inserted before channel `at` (default: after the last),
    whose patch-embedding weights start at zero, so the widened model computes exactly what it did before
    (InstructPix2Pix's initialisation)."""
    old = transformer.patch_embed.proj
    at = old.in_channels if at is None else at
    new = nn.Conv2d(old.in_channels + extra, old.out_channels, old.kernel_size, old.stride, old.padding, bias=old.bias is not None)
    new = new.to(old.weight.device, old.weight.dtype)
    new.weight.zero_()
    new.weight[:, :at] = old.weight[:, :at]
    new.weight[:, at + extra :] = old.weight[:, at:]
    if old.bias is not None:
        new.bias.copy_(old.bias)
    transformer.patch_embed.proj = new
    transformer.register_to_config(in_channels=old.in_channels + extra)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickled_weights(path: Path) -> None:
    """Refuse a model folder holding pickle files (`torch.save`'s *.bin/*.pt...): unpickling runs arbitrary code, and
    this project writes safetensors + JSON only, so such a file is at best stale and at worst hostile."""
    for file in sorted(path.rglob("*")):
        if file.suffix.lower() in PICKLE_SUFFIXES and file.is_file():
            raise CheckpointError(f"{file}: pickle weights are refused (safetensors only); delete the file or convert it")


def image_tokenizer_class(folder: Path) -> type[ImageTokenizer] | type[SemanticEncoder] | type[TATok]:
    """The class an image tokenizer folder was saved from (its config's `_class_name`): VQ, semantic or TA-Tok."""
    try:
        name = json.loads((folder / "config.json").read_text()).get("_class_name")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    if name not in IMAGE_TOKENIZERS:
        raise CheckpointError(f"{folder / 'config.json'}: unknown image tokenizer class {name!r} (expected one of {', '.join(IMAGE_TOKENIZERS)})")
    return IMAGE_TOKENIZERS[name]


def glyph_maps(codes: torch.Tensor, vocab, factor: int) -> torch.Tensor:
    """The glyph condition of semantic blueprints `codes` (B, N): each one's word ink (`glyph_ink`), pixel-unshuffled
    to (B, factor**2, canvas / factor, canvas / factor), so each latent cell reads the ink of its own pixels."""
    ink = torch.from_numpy(np.stack([glyph_ink(row, vocab) for row in codes.tolist()]))
    return torch.nn.functional.pixel_unshuffle(ink[:, None], factor)


def footprint_boxes(codes: torch.Tensor, vocab) -> tuple[torch.Tensor, torch.Tensor]:
    """The drawn boxes of semantic blueprints `codes` (B, N), padded: (B, K, 5) as `object_boxes`, and (B, K) valid."""
    rows = [object_boxes(row, vocab) for row in codes.tolist()]
    k = max(1, max(len(r) for r in rows))
    boxes, valid = torch.zeros(len(rows), k, 5), torch.zeros(len(rows), k, dtype=torch.bool)
    for i, r in enumerate(rows):
        boxes[i, : len(r)] = torch.from_numpy(r)
        valid[i, : len(r)] = True
    return boxes, valid


def _culprit(folder: Path, error: Exception) -> Path:
    """The file a part's loading error is about: its one safetensors file when the weights are damaged, else the folder."""
    files = sorted(folder.glob("*.safetensors"))
    return files[0] if isinstance(error, SafetensorError) and len(files) == 1 else folder


def read_config(path: str | os.PathLike) -> Blip3oNextConfig:
    """A checkpoint folder's model-level config, without loading any weights."""
    config_file = Path(path) / CONFIG_NAME
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (not a BLIP3o-NEXT checkpoint folder)")
    try:
        return Blip3oNextConfig(**_without_removed_keys(json.loads(config_file.read_text()), config_file))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{config_file}: {e}") from None


# Config fields that were removed, with the one value the code still implements: checkpoints saved before keep loading.
REMOVED_CONFIG_KEYS = {"edit_preserve_margin": 0}


def _without_removed_keys(config: dict, config_file: Path) -> dict:
    """`config` without the removed fields that hold the value the code implements (logged); any other value of a
    removed field is an error, since the model would then behave differently from how it was trained."""
    for key, implemented in REMOVED_CONFIG_KEYS.items():
        if key in config:
            value = config.pop(key)
            if value != implemented:
                raise ValueError(f"{key}={value!r} is no longer supported (removed; only {implemented!r} is implemented)")
            logger.warning("%s: ignoring the removed field %s=%r", config_file, key, value)
    return config


def enable_editing(model: Blip3oNext, reference_connector: dict | None = None, **switches: bool) -> Blip3oNext:
    """Turn a text-to-image model into one that edits (before edit SFT): set `editing` and the latent-path
    `switches` (reference_cross_attention, reference_noise_injection, separate_edit_ar) and add the parts they
    need: for cross-attention a new reference connector (C -> D -> D + RMSNorm; `reference_connector` overrides its
    config), for separate_edit_ar a copy of the AR model. Parts already present are kept (resuming)."""
    before = model.reference_input_channels
    model.config = dataclasses.replace(model.config, editing=True, **switches)
    if model.reference_input_channels > before:
        widen_input(model.transformer, model.reference_input_channels - before)
    if model.config.reference_cross_attention and model.reference_connector is None:
        side = model.latent_shape[-1]
        config = dict(hidden_size=model.vae.config.latent_channels, width=model.transformer.config.caption_channels, num_positions=side * side)
        dtype = next(model.connector.parameters()).dtype
        model.reference_connector = Connector(**{**config, **(reference_connector or {})}).to(dtype)
    if model.config.separate_edit_ar and model.edit_ar is None:
        model.edit_ar = copy.deepcopy(model.ar)
    model._check_parts()
    return model


def enable_glyphs(model: Blip3oNext) -> Blip3oNext:
    """Give a semantic-blueprint model the glyph condition (`Blip3oNextConfig.glyph_condition`): its transformer
    gains the glyph channels after the connector's maps, at zero weight, so it renders as before until trained."""
    if not model.config.glyph_condition:
        model.config = dataclasses.replace(model.config, glyph_condition=True)
        widen_input(model.transformer, model.glyph_input_channels, at=model.vae.config.latent_channels + model.connector.map_channels)
    model._check_parts()
    return model


def prompt_states(hidden: torch.Tensor, attention_mask: torch.Tensor, prompt_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states over the prompt tokens of right-padded sequences (those before `prompt_end`, i.e. <im_start>),
    cut to the longest prompt, with their mask."""
    length = int(prompt_end.max())
    positions = torch.arange(length, device=hidden.device)
    mask = (positions[None] < prompt_end[:, None]) & attention_mask[:, :length].bool()
    return hidden[:, :length], mask.long()


def export_model(source: str | os.PathLike, dest: str | os.PathLike, dtype: str = "float16") -> None:
    """Save a trained model in a smaller dtype (loading casts back to float32 by default)."""
    Blip3oNext.from_pretrained(source).to(getattr(torch, dtype)).save_pretrained(dest)
