"""Text-to-image generation and image editing with a BLIP3o-NEXT model.

    pipe = Pipeline.from_pretrained("tiny")  # the bundled model, or a checkpoint folder
    out = pipe(["a photo of a red circle left of a blue star"], seed=0)
    out.images[0].save("out.png"); out.blueprint_previews[0]
    edited = pipe.edit(out.images[0], "make the red circle green", seed=0).images[0]

Steps: (1) check inputs, (2) tokenize prompts (left-padded, truncated with a warning); for an edit, the
instruction followed by the reference image's tokens, (3) sample the blueprint and its hidden states in one
cached AR pass, (4) connector (an edit adds the reference's VAE latents), (5) CFG flow-matching sampling,
(6) decode latents and the blueprint preview.

Slightly over 400 lines on purpose: one class owns both jobs, generate and edit, because they share every step
above but the reference image; split apart, they would repeat the same options, checks and rendering.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .models.autoregressive import Blueprint, SamplingConfig, forced_blueprint, prompt_ids, sample_blueprint
from .models.diffusion import sample_latents
from .fileio import to_rgb
from .models.image_tokenizer import ImageTokenizer, images_to_tensor, tensor_to_images
from .models.modeling import Blip3oNext
from .models.semantic_blueprint import SemanticVocab, changed_region, kept_on_new_background
from .models.semantic_encoder import SemanticEncoder
from .models.released_checkpoint import PROMPT_TEMPLATE, is_released_layout, load_released, released_prompt
from .models.vae import decode_latents, encode_latents
from .shapeworld.world import BACKGROUNDS

logger = logging.getLogger(__name__)

# Shipped with the package (float16). "tiny" is the semantic-blueprint model that generates and edits with one AR
# model: text-to-image training and GRPO (docs/semantic_blueprint.md, docs/rl_semantic.md), then edit SFT and GRPO
# (docs/editing.md).
BUNDLED_MODELS = {"tiny": Path(__file__).parent / "weights" / "tiny"}


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled model's name ("tiny") or a checkpoint folder -> the folder."""
    if str(name_or_path) in BUNDLED_MODELS:
        return BUNDLED_MODELS[str(name_or_path)]
    return Path(name_or_path)


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    blueprints: torch.Tensor  # (B, n) image-codebook indices written by the AR model
    blueprint_previews: list[Image.Image]  # the image tokenizer's decoding of the blueprint (empty for TA-Tok: no pixel decoder)


@dataclass
class EditInputs:
    pixels: torch.Tensor  # (B, 3, S, S) reference images in [-1, 1]
    reference_codes: torch.Tensor  # (B, n) their image tokens
    input_ids: torch.Tensor  # left-padded instruction + reference tokens
    attention_mask: torch.Tensor


@dataclass
class GenerationOptions:
    """The options of generation and edits alike: keyword arguments of `Pipeline.__call__` and `Pipeline.edit`.
    Unset (None) ones take the model's defaults (its config)."""

    seed: int | None = None  # seeds a new generator; ignored when `generator` is given
    generator: torch.Generator | None = None
    num_inference_steps: int | None = None  # diffusion steps
    guidance_scale: float | None = None  # classifier-free guidance
    sampling: SamplingConfig | None = None  # the AR sampling options at once, in place of temperature, top_k and top_p
    temperature: float | None = None  # AR sampling; 0 = greedy
    id_temperature: float | None = None  # semantic blueprints: a token's id within its kind (SamplingConfig)
    best_of: int | None = None  # blueprints sampled per image, the most likely one kept (SamplingConfig)
    top_k: int | None = None
    top_p: float | None = None
    progress: bool = False  # a progress bar over the diffusion steps
    latents: torch.Tensor | None = None  # (B, C, H, W) the diffusion's starting noise, as in diffusers (e.g. shared by
    # images that should differ only in their blueprints)
    blueprints: torch.Tensor | None = None  # (B, N) image-token codes rendered instead of sampled ones (teacher-forced
    # through the AR model; e.g. the image tokenizer's codes of a real image, as in benchmarks/blueprint_ceiling.py)


class Pipeline:
    """Registers a model's parts by name and runs generation; owns no weights of its own."""

    def __init__(self, model: Blip3oNext, device: str | torch.device = "cpu", compile_transformer: bool = False, compile_ar: bool = False):
        """`compile_transformer` and `compile_ar` run the diffusion transformer and the AR model's per-token step
        through `compile_for_inference`. On this project's 2-core CPU, diffusion steps ran 1.2-1.4x faster and the AR
        part 1.5-2.9x, after a one-off compilation of 7-40 s per batch size (docs/benchmarks.md). Worth it for
        servers, evaluations and benchmarks, not for one image."""
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.transformer = compile_for_inference(self.model.transformer) if compile_transformer else self.model.transformer
        self.ar_decoder = compile_for_inference(self.model.ar.model) if compile_ar else None
        separate = compile_ar and self.model.edit_ar is not None
        self.edit_ar_decoder = compile_for_inference(self.model.edit_ar.model) if separate else self.ar_decoder

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike = "tiny",
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
        compile_transformer: bool = False,
        compile_ar: bool = False,
        ta_tok: str | os.PathLike | None = None,
        siglip: str | os.PathLike | None = None,
        diffusion: str | os.PathLike | None = None,
    ) -> "Pipeline":
        """Load a checkpoint folder or a bundled model by name; weights are cast to `torch_dtype`
        (the bundled ones are stored in float16 and run in float32 by default). A folder in the official BLIP3o-NEXT
        release layout is read by `models.released_checkpoint.load_released`, which also needs the local `ta_tok` file,
        `siglip` and `diffusion` (SANA 1.5) folders it names."""
        folder = resolve_model_path(path)
        if is_released_layout(folder):
            model = load_released(folder, ta_tok=ta_tok, siglip=siglip, diffusion=diffusion, torch_dtype=torch_dtype)
        else:
            model = Blip3oNext.from_pretrained(folder, torch_dtype=torch_dtype)
        return cls(model, device, compile_transformer=compile_transformer, compile_ar=compile_ar)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)

    def generate_in_batches(
        self, prompts: list[str], batch_size: int = 16, seed: int = 0, progress: bool = True, reference_images: list | None = None, **kwargs
    ) -> PipelineOutput:
        """Generate one image per prompt (or, with `reference_images`, edit each image by its prompt), `batch_size`
        at a time; batch k is drawn with seed `seed + k`, so a run is reproducible for the same batch size.
        `kwargs` are the generation options of `__call__`."""
        from tqdm.auto import tqdm

        images, blueprints, previews = [], [], []
        for k, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", disable=not progress)):
            batch = prompts[start : start + batch_size]
            if reference_images is None:
                out = self(batch, seed=seed + k, **kwargs)
            else:
                out = self.edit(reference_images[start : start + batch_size], batch, seed=seed + k, **kwargs)
            images += out.images
            blueprints.append(out.blueprints)
            previews += out.blueprint_previews
        return PipelineOutput(images=images, blueprints=torch.cat(blueprints), blueprint_previews=previews)

    @property
    def can_edit(self) -> bool:
        """Whether the model was trained to edit (edit SFT)."""
        return self.model.config.editing

    @property
    def max_prompt_tokens(self) -> int:
        """Room left in the AR context after <im_start><S0>, the image tokens and <im_end>."""
        return self.model.ar.config.max_position_embeddings - (self.model.span_length + 2)

    def tokenize(self, prompts: list[str], reference_codes: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded AR inputs and mask: the prompts, or for edits each instruction followed by its reference
        image's tokens. Text longer than the context allows keeps its first tokens (with a warning)."""
        tok = self.model.tokenizer
        limit = self.max_prompt_tokens - (self.model.span_length + 2 if reference_codes is not None else 0)
        if self.model.config.extra.get("prompt_template") == PROMPT_TEMPLATE:  # a model converted from the official release
            if reference_codes is not None:
                raise ValueError("edits with the released models' prompt layout are not wired yet (see released_checkpoint.py)")
            prompts = [released_prompt(tok, p) for p in prompts]
        rows = []
        for i, p in enumerate(prompts):
            ids, truncated = prompt_ids(tok, self.model.image_vocab, p, limit, None if reference_codes is None else reference_codes[i])
            if truncated:
                logger.warning("prompt %d is longer than the %d tokens that fit the context; truncated", i, limit)
            rows.append(ids)
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, length - len(r) :] = torch.tensor(r)
                mask[i, length - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _resolve(self, options: GenerationOptions, edit: bool = False) -> GenerationOptions:
        """`options` checked, with the unset ones taken from the model's config (for edits, its `edit_temperature`)
        and `seed` turned into a generator."""
        cfg = self.model.config
        temperature = options.temperature
        if temperature is None and edit and cfg.edit_temperature is not None:
            temperature = cfg.edit_temperature
        steps = cfg.num_inference_steps if options.num_inference_steps is None else options.num_inference_steps
        guidance = cfg.guidance_scale if options.guidance_scale is None else options.guidance_scale
        sampling = options.sampling or SamplingConfig(
            temperature=cfg.temperature if temperature is None else temperature,
            top_k=cfg.top_k if options.top_k is None else options.top_k,
            top_p=cfg.top_p if options.top_p is None else options.top_p,
            id_temperature=cfg.id_temperature if options.id_temperature is None else options.id_temperature,
            best_of=cfg.best_of if options.best_of is None else options.best_of,
        )
        if steps < 1 or not (math.isfinite(guidance) and guidance >= 0):
            raise ValueError(f"need num_inference_steps >= 1 and a finite guidance_scale >= 0, got {steps}, {guidance}")
        return GenerationOptions(
            generator=_generator(options.generator, options.seed), num_inference_steps=steps, guidance_scale=guidance, sampling=sampling,
            progress=options.progress, latents=options.latents, blueprints=options.blueprints,
        )

    @torch.no_grad()
    def __call__(self, prompts: str | list[str], **options: Any) -> PipelineOutput:
        """Generate one image per prompt. `options` are `GenerationOptions`' fields (seed, num_inference_steps,
        guidance_scale, temperature, top_k, top_p, ...); unset ones take the model's defaults (its config)."""
        prompts = _texts(prompts, "prompt")
        resolved = self._resolve(GenerationOptions(**options))
        self._check_batch(resolved, len(prompts))
        ids, mask = self.tokenize(prompts)
        return self._render(ids, mask, resolved)

    @torch.no_grad()
    def edit(
        self, images: Image.Image | np.ndarray | list, instructions: str | list[str], preserve_unchanged: bool | None = None, **options: Any
    ) -> PipelineOutput:
        """Edit each image by its instruction (one image with several instructions, or several images with one
        instruction, pair up too). Images of another size are resized to the model's, with a notice; any mode
        (grayscale, RGBA, paletted) is converted to RGB. `options` as in `__call__` (`GenerationOptions`).

        `preserve_unchanged` (None: the model's `edit_preserve_unchanged`) keeps the reference where the edit's
        blueprint left it unchanged: the cells whose tokens differ from the reference's are generated, and the rest is
        held at the reference's latents during sampling (`sample_latents`' `known`); with the model's
        `edit_paste_unchanged`, the decoded image then takes the reference's own pixels there."""
        resolved = self._resolve(GenerationOptions(**options), edit=True)
        inputs = self.edit_inputs(images, instructions)
        self._check_batch(resolved, len(inputs.input_ids))
        if preserve_unchanged is None:
            preserve_unchanged = self.model.config.edit_preserve_unchanged
        return self._render(
            inputs.input_ids, inputs.attention_mask, resolved, reference_latents=encode_latents(self.model.vae, inputs.pixels),
            preserve=(inputs.reference_codes, inputs.pixels) if preserve_unchanged else None,
        )

    def _check_batch(self, options: GenerationOptions, n: int) -> None:
        """`latents` and `blueprints`, if given, fit a batch of `n`."""
        self._check_latents(options.latents, n)
        self._check_blueprints(options.blueprints, n)

    def _check_latents(self, latents: torch.Tensor | None, n: int) -> None:
        if latents is not None and tuple(latents.shape) != (n, *self.model.latent_shape):
            raise ValueError(f"latents must have shape {(n, *self.model.latent_shape)}, got {tuple(latents.shape)}")

    def _check_blueprints(self, blueprints: torch.Tensor | None, n: int) -> None:
        if blueprints is None:
            return
        shape, codebook = (n, self.model.num_image_tokens), self.model.image_vocab.codebook_size
        if tuple(blueprints.shape) != shape or blueprints.is_floating_point():
            raise ValueError(f"blueprints must be integer codes of shape {shape}, got {blueprints.dtype} {tuple(blueprints.shape)}")
        if blueprints.min() < 0 or blueprints.max() >= codebook:
            raise ValueError(f"blueprint codes must lie in 0..{codebook - 1}, got {int(blueprints.min())}..{int(blueprints.max())}")

    def edit_inputs(self, images: Image.Image | np.ndarray | list, instructions: str | list[str]) -> EditInputs:
        """The AR and diffusion inputs of edits: reference pixels, their image tokens, and the instructions followed
        by those tokens (one image with several instructions, or several images with one instruction, pair up)."""
        if not self.can_edit:
            raise ValueError("this model was not trained to edit (no edit SFT); train one with `blip3o train --config configs/tiny/5_edit_sft.yaml`")
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        instructions = _texts(instructions, "instruction")
        if len(images) != len(instructions) and 1 not in (len(images), len(instructions)):
            raise ValueError(f"{len(images)} images and {len(instructions)} instructions do not pair up")
        n = max(len(images), len(instructions))
        images, instructions = images * (n // len(images)), instructions * (n // len(instructions))
        x = images_to_tensor(np.stack([self.reference_array(im, i) for i, im in enumerate(images)])).to(self.device, self.model.vae.dtype)
        codes = self.image_codes(x)
        ids, mask = self.tokenize(instructions, codes.tolist())
        return EditInputs(pixels=x, reference_codes=codes, input_ids=ids, attention_mask=mask)

    def image_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """The image tokenizer's codes (B, N) of (B, 3, S, S) pixels in [-1, 1] (`images_to_tensor`)."""
        tokenizer = self.model.image_tokenizer
        return tokenizer.encode(pixels.to(self.device, next(tokenizer.parameters()).dtype))

    def reference_array(self, image: Image.Image | np.ndarray, index: int = 0) -> np.ndarray:
        """An image to edit as an (S, S, 3) uint8 array at the model's size S."""
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim not in (2, 3):
                raise ValueError(f"image {index}: expected a uint8 (H, W) or (H, W, C) array, got {image.dtype} {image.shape}")
            image = Image.fromarray(image)
        if not isinstance(image, Image.Image):
            raise ValueError(f"image {index}: expected a PIL image or a uint8 array, got {type(image).__name__}")
        image = to_rgb(image)
        size = self.model.config.image_size
        if image.size != (size, size):
            logger.warning("image %d is %dx%d; resized to the model's %dx%d", index, *image.size, size, size)
            image = image.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(image)

    @torch.no_grad()
    def sample_blueprints(
        self, prompts: str | list[str], seed: int | None = None, generator: torch.Generator | None = None, sampling: SamplingConfig | None = None,
        images: Image.Image | np.ndarray | list | None = None,
    ) -> torch.Tensor:
        """The blueprints (B, N) the AR model writes for prompts, or with `images` for edits of those images by the
        prompts as instructions, without rendering them (what the plan score and RL on plan rewards read). Options
        as in `__call__` (for edits, `edit`); the same seed writes the same blueprints as `__call__` or `edit`."""
        edits = images is not None
        sampling = self._resolve(GenerationOptions(sampling=sampling), edit=edits).sampling
        if edits:
            inputs = self.edit_inputs(images, prompts)
            ids, mask = inputs.input_ids, inputs.attention_mask
        else:
            ids, mask = self.tokenize(_texts(prompts, "prompt"))
        return self.written_blueprint(ids, mask, sampling, _generator(generator, seed), edits).codes.cpu()

    def written_blueprint(
        self, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None, edits: bool = False
    ) -> Blueprint:
        """The blueprint the AR model (the edit AR model for `edits`) samples after AR inputs that are already built
        (`tokenize`, `edit_inputs`), with its own hidden states; RL rollouts, which keep those inputs, call it."""
        model = self.model
        decoder = self.edit_ar_decoder if edits else self.ar_decoder
        return sample_blueprint(model.ar_for(edits), ids, mask, model.image_vocab, model.num_image_tokens, sampling, generator,
                                decoder, model.image_embedding)

    def _blueprint(
        self, ids: torch.Tensor, mask: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None, edits: bool = False,
        blueprints: torch.Tensor | None = None,
    ) -> Blueprint:
        """The blueprint and the hidden states that condition the renderer: sampled in one cached pass, or for given
        `blueprints` teacher-forced. A model with a reader (`Blip3oNext.add_reader`) re-reads the blueprint through
        it in one teacher-forced pass, and the reader's states condition the renderer."""
        model = self.model
        if blueprints is None:
            bp = self.written_blueprint(ids, mask, sampling, generator, edits)
            if model.reader_ar is None:
                return bp
            blueprints = bp.codes
        ar, embedding = (model.reader_ar, model.reader_embedding) if model.reader_ar is not None else (model.ar_for(edits), model.image_embedding)
        return forced_blueprint(ar, model.image_vocab, ids, mask, blueprints.to(ids.device, torch.long), embedding)

    def _render(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        options: GenerationOptions,
        reference_latents: torch.Tensor | None = None,
        preserve: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> PipelineOutput:
        """From AR inputs to images, with resolved `options` (`_resolve`): (1) the blueprint and its hidden states in one
        cached pass (or, for given `blueprints`, one teacher-forced pass), (2) the connector
        (plus an edit's reference latents), (3) CFG flow-matching sampling (from `latents` if given; with `preserve`,
        the reference's codes and pixels, cells the blueprint keeps stay at the reference latents), (4) decoding
        (with `preserve` and `edit_paste_unchanged`, those cells then take the reference's pixels)."""
        model = self.model
        generator, noise = options.generator, options.latents
        bp = self._blueprint(ids, mask, options.sampling, generator, edits=reference_latents is not None, blueprints=options.blueprints)
        if model.config.condition_source == "prompt":  # the no-blueprint ablation: the prompt's states
            condition = model.condition(bp.prompt_hidden_states, mask)
        else:
            condition = model.condition(bp.hidden_states, codes=bp.codes)
        if reference_latents is not None:
            condition = model.with_reference(condition, reference_latents)
        known = None
        if preserve is not None:
            reference_codes, reference_pixels = preserve
            vocab = model.image_embedding.vocab if model.semantic else None
            keep = unchanged_cells(bp.codes, reference_codes, 0, model.latent_shape[1:], vocab)
            known = reference_latents, keep
        latents = sample_latents(
            self.transformer, model.scheduler.config, condition, model.latent_shape,
            num_steps=options.num_inference_steps, guidance_scale=options.guidance_scale, generator=generator, progress=options.progress,
            latents=None if noise is None else noise.to(self.device, condition.tokens.dtype), known=known,
        )
        decoded = decode_latents(model.vae, latents)
        if preserve is not None and model.config.edit_paste_unchanged:
            keep = F.interpolate(keep, size=tuple(decoded.shape[-2:]), mode="nearest")  # the cells held during sampling
            decoded = torch.lerp(decoded, reference_pixels.to(decoded.dtype), keep.to(decoded.dtype))
            if vocab is not None:
                decoded = paste_kept_ink(decoded, reference_pixels, bp.codes, reference_codes, vocab)
        images = tensor_to_images(decoded)
        # Only this project's tokenizers draw their codes; TA-Tok's decoder rebuilds SigLIP features, not pixels.
        drawn = isinstance(model.image_tokenizer, (ImageTokenizer, SemanticEncoder))
        previews = tensor_to_images(model.image_tokenizer.decode(bp.codes)) if drawn else []
        return PipelineOutput(
            images=[Image.fromarray(a) for a in images],
            blueprints=bp.codes.cpu(),
            blueprint_previews=[Image.fromarray(a) for a in previews],
        )


def unchanged_cells(
    codes: torch.Tensor, reference_codes: torch.Tensor, margin: int, size: tuple[int, int], vocab: SemanticVocab | None = None
) -> torch.Tensor:
    """(B, 1, H, W) mask at size (H, W), 1 where an edit's blueprint `codes` (B, N) keeps its reference's content,
    every changed cell widened by `margin` cells of the blueprint's grid (VQ: the tokenizer sees across cell
    borders) or of (H, W) (semantic). VQ codes: the cells whose token is the reference's. Semantic blueprints (their
    `vocab` given): the cells `semantic_blueprint.changed_region` leaves untouched (no object or word there changed)."""
    if vocab is not None:
        regions = [changed_region(c, r, vocab=vocab) for c, r in zip(codes.tolist(), reference_codes.tolist())]
        changed = F.adaptive_max_pool2d(torch.from_numpy(np.stack(regions)).float()[:, None], size)
        if margin > 0:
            changed = F.max_pool2d(changed, 2 * margin + 1, stride=1, padding=margin)
        return (1.0 - changed).to(codes.device)
    side = math.isqrt(codes.shape[1])
    changed = (codes != reference_codes).float().view(-1, 1, side, side)
    if margin > 0:
        changed = F.max_pool2d(changed, 2 * margin + 1, stride=1, padding=margin)
    return 1.0 - F.interpolate(changed, size=size, mode="nearest")


INK_THRESHOLD = 0.25  # [-1, 1] pixel units (32 of 255): a reference pixel this far from its background colour is ink


def paste_kept_ink(
    decoded: torch.Tensor, reference_pixels: torch.Tensor, codes: torch.Tensor, reference_codes: torch.Tensor, vocab: SemanticVocab
) -> torch.Tensor:
    """Edits whose semantic blueprint changes the background redraw the whole image; the objects and word they keep
    then take the reference's own pixels where those are ink (pixels of their boxes farther than INK_THRESHOLD from
    the reference's background colour), over the new background (`semantic_blueprint.kept_on_new_background`)."""
    out = decoded.clone()
    for i, (ids, reference_ids) in enumerate(zip(codes.tolist(), reference_codes.tolist())):
        kept = kept_on_new_background(ids, reference_ids, vocab)
        if kept is None:
            continue
        background, boxes = kept
        reference = reference_pixels[i].to(decoded.dtype)
        colour = torch.tensor(BACKGROUNDS[background], dtype=decoded.dtype, device=decoded.device).div(127.5).sub(1.0)
        ink = (reference - colour[:, None, None]).abs().amax(0) > INK_THRESHOLD
        where = F.interpolate(torch.from_numpy(boxes)[None, None].float(), size=tuple(ink.shape), mode="nearest")[0, 0].bool()
        out[i] = torch.where(ink & where.to(ink.device), reference, out[i])
    return out


def compile_for_inference(module: torch.nn.Module) -> Callable:
    """`torch.compile` for a module whose weights stay fixed. Inductor fuses the elementwise work between the
    GEMMs, and its freezing folds the weights in as constants (on a CPU, oneDNN prepacks them for its GEMMs and
    convolutions). Shapes are static, so each new batch size compiles once. Weights changed after the first call
    are not seen: compile only frozen modules (inference, or the frozen renderer during RL)."""
    return torch.compile(module, dynamic=False, options={"freezing": True})


def _texts(texts: str | list[str], what: str) -> list[str]:
    """One or more non-empty texts (prompts or instructions), or a ValueError naming the empty one."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError(f"no {what} given")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise ValueError(f"{what} {i} is empty")
    return texts


def _generator(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    if generator is None and seed is not None:
        return torch.Generator().manual_seed(seed)
    return generator
