"""Text-to-image generation with a BLIP3o-NEXT model.

    pipe = Pipeline.from_pretrained("tiny")  # the bundled model, or a checkpoint folder
    out = pipe(["a photo of a red circle left of a blue star"], seed=0)
    out.images[0].save("out.png"); out.blueprint_previews[0]

Steps: (1) check inputs, (2) tokenize prompts (left-padded, truncated with a warning), (3) sample the
blueprint and its hidden states in one cached AR pass, (4) connector, (5) CFG flow-matching sampling,
(6) decode latents and the blueprint preview.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .autoregressive import SamplingConfig, sample_blueprint
from .diffusion import sample_latents
from .image_tokenizer import tensor_to_images
from .modeling import Blip3oNext
from .vae import decode_latents

logger = logging.getLogger(__name__)

BUNDLED_MODELS = {"tiny": Path(__file__).parent / "weights" / "tiny"}  # shipped with the package (float16)


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A bundled model's name ("tiny") or a checkpoint folder -> the folder."""
    if str(name_or_path) in BUNDLED_MODELS:
        return BUNDLED_MODELS[str(name_or_path)]
    return Path(name_or_path)


@dataclass
class PipelineOutput:
    images: list[Image.Image]
    blueprints: torch.Tensor  # (B, n) image-codebook indices written by the AR model
    blueprint_previews: list[Image.Image]  # the image tokenizer's decoding of the blueprint


class Pipeline:
    """Registers a model's parts by name and runs generation; owns no weights of its own."""

    def __init__(self, model: Blip3oNext, device: str | torch.device = "cpu", compile_transformer: bool = False):
        """`compile_transformer` runs the diffusion transformer through torch.compile: about 2x faster steps on a
        CPU after a one-off compilation (tens of seconds), worth it for servers and long evaluations."""
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.transformer = torch.compile(self.model.transformer) if compile_transformer else self.model.transformer

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike = "tiny",
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
        compile_transformer: bool = False,
    ) -> "Pipeline":
        """Load a checkpoint folder or a bundled model by name; weights are cast to `torch_dtype`
        (the bundled ones are stored in float16 and run in float32 by default)."""
        return cls(Blip3oNext.from_pretrained(resolve_model_path(path), torch_dtype=torch_dtype), device, compile_transformer)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        self.model.save_pretrained(path)

    def generate_in_batches(self, prompts: list[str], batch_size: int = 16, seed: int = 0, progress: bool = True, **kwargs) -> PipelineOutput:
        """Generate one image per prompt, `batch_size` at a time; batch k is drawn with seed `seed + k`, so a run
        is reproducible for the same batch size. `kwargs` are the generation options of `__call__`."""
        from tqdm.auto import tqdm

        images, blueprints, previews = [], [], []
        for k, start in enumerate(tqdm(range(0, len(prompts), batch_size), desc="generating", unit="batch", disable=not progress)):
            out = self(prompts[start : start + batch_size], seed=seed + k, **kwargs)
            images += out.images
            blueprints.append(out.blueprints)
            previews += out.blueprint_previews
        return PipelineOutput(images=images, blueprints=torch.cat(blueprints), blueprint_previews=previews)

    @property
    def max_prompt_tokens(self) -> int:
        """Room left in the AR context after <im_start><S0>, the image tokens and <im_end>."""
        return self.model.ar.config.max_position_embeddings - (self.model.span_length + 2)

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Left-padded prompt ids and mask; prompts longer than the context keep their first tokens (with a warning)."""
        tok = self.model.tokenizer
        rows = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        limit = self.max_prompt_tokens
        for i, r in enumerate(rows):
            if len(r) > limit:
                logger.warning("prompt %d has %d tokens; truncated to the %d that fit the context", i, len(r), limit)
                rows[i] = r[:limit]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, length - len(r) :] = torch.tensor(r)
                mask[i, length - len(r) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        seed: int | None = None,
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        sampling: SamplingConfig | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        progress: bool = False,
    ) -> PipelineOutput:
        """Generate one image per prompt. Unset options take the model's defaults (its config);
        `sampling` replaces all AR sampling options at once."""
        # 1. check inputs
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("no prompt given")
        for i, p in enumerate(prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty")
        cfg = self.model.config
        steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        sampling = sampling or SamplingConfig(
            temperature=cfg.temperature if temperature is None else temperature,
            top_k=cfg.top_k if top_k is None else top_k,
            top_p=cfg.top_p if top_p is None else top_p,
        )
        if steps < 1 or guidance < 0:
            raise ValueError(f"need num_inference_steps >= 1 and guidance_scale >= 0, got {steps}, {guidance}")
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        # 2. tokenize
        ids, mask = self.tokenize(prompts)
        # 3. blueprint + hidden states, one cached pass
        bp = sample_blueprint(self.model.ar, ids, mask, self.model.image_vocab, self.model.num_image_tokens, sampling, generator)
        # 4. connector (over the blueprint's hidden states; the no-blueprint ablation uses the prompt's)
        if cfg.condition_source == "prompt":
            condition = self.model.condition(bp.prompt_hidden_states, mask)
        else:
            condition = self.model.condition(bp.hidden_states)
        # 5. CFG flow-matching sampling
        latents = sample_latents(
            self.transformer, self.model.scheduler.config, condition, self.model.latent_shape,
            num_steps=steps, guidance_scale=guidance, generator=generator, progress=progress,
        )
        # 6. decode
        images = tensor_to_images(decode_latents(self.model.vae, latents))
        previews = tensor_to_images(self.model.image_tokenizer.decode(bp.codes))
        return PipelineOutput(
            images=[Image.fromarray(a) for a in images],
            blueprints=bp.codes.cpu(),
            blueprint_previews=[Image.fromarray(a) for a in previews],
        )
