"""The VAE: diffusers' AutoencoderDC (DC-AE). Official: SANA's DC-AE f32c32 (1024 px -> 32 x 32 x 32 latents);
the tiny preset compresses 64 px by 4 to 16 x 16 x 8.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderDC


def tiny_vae_config(latent_channels: int = 8) -> dict:
    """Three stages of ResBlocks (two 2x downsamplings): 64 px -> 16 x 16 latents. The first stage has no blocks, so its
    pixel-unshuffle convolution is the only layer at full resolution (cheap enough to train on a CPU)."""
    return dict(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=16,
        encoder_block_types="ResBlock",  # EfficientViT blocks (linear attention) double the CPU cost at this size
        decoder_block_types="ResBlock",
        encoder_block_out_channels=(32, 64, 128),
        decoder_block_out_channels=(32, 64, 128),
        encoder_layers_per_block=(0, 1, 1),
        decoder_layers_per_block=(0, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
    )


def dc_ae_f32c32_config() -> dict:
    """The layout of SANA's DC-AE f32c32 (diffusers' defaults for AutoencoderDC)."""
    return dict(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=32,
        encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate",
        scaling_factor=0.41407,
    )


def spatial_compression(vae: AutoencoderDC) -> int:
    return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


def encode_latents(vae: AutoencoderDC, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] -> scaled latents (what the diffusion model sees)."""
    return vae.encode(images).latent * vae.config.scaling_factor


def decode_latents(vae: AutoencoderDC, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in [-1, 1]."""
    return vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def calibrate_scaling_factor(vae: AutoencoderDC, images: torch.Tensor) -> float:
    """Set `scaling_factor` so that scaled latents have unit standard deviation on `images` (as SANA's DC-AE
    factor does for its data): flow matching assumes data and noise on the same scale."""
    std = float(vae.encode(images).latent.float().std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return 1.0 / std
