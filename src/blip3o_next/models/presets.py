"""The presets: the part configs of `tiny` (64 px, trains on a CPU) and of `next-3b` (the official sizes), and a new
model built from part configs around given (or new) tokenizer parts and VAE."""

from __future__ import annotations

import torch
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from .connector import Connector
from .image_tokenizer import ImageTokenizer, token_grid
from .modeling import Blip3oNext, Blip3oNextConfig
from .semantic_embedding import SemanticEmbedding
from .semantic_encoder import SemanticEncoder
from .text_tokenizer import extend_tokenizer


def tiny_parts_configs(vocab_size: int, codebook_size: int = 512, semantic: bool = False) -> dict[str, dict]:
    """Configs of the tiny preset (64 px, trains on a CPU). `vocab_size` is the extended tokenizer's size.

    `semantic`: the blueprint is the semantic one (69 tokens, `semantic_blueprint.py`) instead of 16 x 16 VQ codes;
    the connector then also paints each object's footprint (16 channels + 2 offsets)."""
    hidden, width, latent_channels, spatial = 256, 256, 8, 16
    image_tokenizer = dict(image_size=64, patch_size=4, channels=(64, 128), code_dim=32, codebook_size=codebook_size)
    if semantic:
        from .semantic_blueprint import DEFAULT_CONFIG

        span_length, footprint = 1 + DEFAULT_CONFIG.seq_len, spatial
    else:
        span_length, footprint = 1 + token_grid(image_tokenizer["image_size"], image_tokenizer["patch_size"], image_tokenizer["channels"]) ** 2, 0
    map_channels = spatial + (footprint + 2 if footprint else 0)
    return {
        "image_tokenizer": image_tokenizer,
        "ar": dict(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, max_position_embeddings=256, tie_word_embeddings=True),
        # Explicit positions on both sides of the cross-attention (span positions; sincos on the latent grid) and
        # the spatial map (connector.py): the tiny model must get the blueprint-cell -> latent-cell alignment
        # from little data.
        "connector": dict(hidden_size=hidden, width=width, num_positions=span_length, spatial_channels=spatial, footprint_channels=footprint),
        "transformer": dict(in_channels=latent_channels + map_channels, out_channels=latent_channels, num_attention_heads=4, attention_head_dim=32, num_layers=4,
                            num_cross_attention_heads=4, cross_attention_head_dim=32, cross_attention_dim=128,
                            caption_channels=width, sample_size=16, patch_size=1, interpolation_scale=1.0),
        "vae": "tiny",
    }


def next3b_parts_configs() -> dict[str, dict]:
    """Configs of the official-size parts: Qwen3-1.7B, SANA 1.5 1.6B, DC-AE f32c32, D = 2304, 729 tokens, 65,536 codes."""
    vocab = 151_936 + 5 + 65_536  # Qwen3 vocabulary + <im_start>, <im_end>, <S0..S2> + image codes
    return {
        "ar": dict(vocab_size=vocab, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, tie_word_embeddings=True),
        "connector": dict(hidden_size=2048, width=2304),
        "transformer": dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
                            num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240,
                            caption_channels=2304, sample_size=32, patch_size=1, qk_norm="rms_norm_across_heads"),
        "vae": "dc-ae-f32c32",
    }


def _vae_config(spec: str | dict) -> dict:
    from .vae import dc_ae_f32c32_config, tiny_vae_config

    return {"tiny": tiny_vae_config, "dc-ae-f32c32": dc_ae_f32c32_config}[spec]() if isinstance(spec, str) else spec


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    configs: dict,
    config: Blip3oNextConfig | None = None,
    image_tokenizer: ImageTokenizer | SemanticEncoder | None = None,
    vae: AutoencoderDC | None = None,
) -> Blip3oNext:
    """New AR model, connector and transformer from configs, around the given (or new) tokenizer parts and VAE.

    The tokenizer is extended for the image codebook; the AR vocabulary grows to fit it (with a semantic
    blueprint, to the text rows: a new `SemanticEmbedding` holds the image rows).
    """
    image_tokenizer = image_tokenizer or ImageTokenizer(**configs["image_tokenizer"])
    tokenizer, image_vocab = extend_tokenizer(tokenizer, image_tokenizer.codebook_size)
    semantic = isinstance(image_tokenizer, SemanticEncoder)
    rows = image_vocab.image_offset if semantic else len(tokenizer)
    ar_config = {**configs["ar"], "vocab_size": max(configs["ar"].get("vocab_size", 0), rows)}
    embedding = None
    if semantic:
        c = image_tokenizer.config
        embedding = SemanticEmbedding(ar_config["hidden_size"], image_size=c.image_size, grid=c.grid, offset_bins=c.offset_bins, letter_slots=c.letter_slots)
    return Blip3oNext(
        config or Blip3oNextConfig(image_size=image_tokenizer.config.image_size),
        tokenizer,
        image_tokenizer,
        Qwen3ForCausalLM(Qwen3Config(**ar_config)),
        Connector(**configs["connector"]),
        SanaTransformer2DModel(**configs["transformer"]),
        vae or AutoencoderDC(**_vae_config(configs["vae"])),
        FlowMatchEulerDiscreteScheduler(),
        image_embedding=embedding,
    )


def meta_parameter_counts(configs: dict) -> dict[str, int]:
    """Parameter count of each part, built on the meta device (no memory, no weights): checks full-size presets."""
    vae_config = _vae_config(configs["vae"])
    with torch.device("meta"):
        parts = {
            "ar": Qwen3ForCausalLM(Qwen3Config(**configs["ar"])),
            "connector": Connector(**configs["connector"]),
            "transformer": SanaTransformer2DModel(**configs["transformer"]),
            "vae": AutoencoderDC(**vae_config),
        }
    return {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
