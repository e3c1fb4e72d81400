"""The diffusion side: diffusers' SanaTransformer2DModel on VAE latents, trained by flow matching and sampled
with FlowMatchEulerDiscreteScheduler under classifier-free guidance.

Flow matching (as in SANA / BLIP3o-NEXT): x_t = (1 - sigma) x0 + sigma * noise with sigma ~ U(0, 1); the
network predicts the velocity noise - x0 at timestep sigma * num_train_timesteps. The unconditional branch of
CFG is the all-zero AR condition, which training shows with probability `condition_dropout`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

Generators = torch.Generator | list[torch.Generator] | None  # a list gives each sample its own stream


def uniform(n: int, generator: Generators, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n draws from U(0, 1); with a list of generators, draw i comes from generator i (independent of batching)."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g) for g in generator]).to(device, dtype)
    return torch.rand(n, generator=generator).to(device, dtype)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma * noise, sigma per sample."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents + s * noise


def drop_condition(condition: torch.Tensor, probability: float, generator: Generators = None) -> torch.Tensor:
    """Zero each sample's AR condition with `probability` (teaches the unconditional branch used by CFG)."""
    if probability <= 0:
        return condition
    keep = uniform(condition.shape[0], generator, condition.device) >= probability
    return condition * keep.view(-1, *([1] * (condition.ndim - 1))).to(condition.dtype)


def flow_matching_loss(
    transformer: SanaTransformer2DModel,
    latents: torch.Tensor,
    condition: torch.Tensor,
    num_train_timesteps: int = 1000,
    generator: Generators = None,
    condition_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the predicted and true velocity at uniformly drawn noise levels.

    `condition_mask` (B, L) marks the condition positions to attend to (default: all)."""
    sigmas = uniform(latents.shape[0], generator, latents.device, latents.dtype)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    pred = transformer(
        noisy_latents(latents, noise, sigmas), encoder_hidden_states=condition, encoder_attention_mask=condition_mask,
        timestep=sigmas * num_train_timesteps,
    ).sample
    return F.mse_loss(pred.float(), (noise - latents).float())


@torch.no_grad()
def sample_latents(
    transformer: SanaTransformer2DModel,
    scheduler_config: dict,
    condition: torch.Tensor,
    latent_shape: tuple[int, int, int],
    num_steps: int = 30,
    guidance_scale: float = 2.0,
    generator: Generators = None,
    latents: torch.Tensor | None = None,
    progress: bool = False,
    model_input: Callable[[torch.Tensor], torch.Tensor] | None = None,
    condition_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Euler flow-matching sampling from noise, guided by `condition` (B, L, D) against the zero condition.

    A fresh scheduler is built from `scheduler_config` on every call, so sampling shares no mutable state.
    `model_input` may transform the latents before the transformer sees them (e.g. to attach a reference).
    """
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps, device=condition.device)
    b = condition.shape[0]
    if latents is None:
        latents = randn_tensor((b, *latent_shape), generator=generator, device=condition.device, dtype=condition.dtype)
    use_cfg = guidance_scale != 1.0
    cond = torch.cat([torch.zeros_like(condition), condition]) if use_cfg else condition
    mask = torch.cat([condition_mask, condition_mask]) if use_cfg and condition_mask is not None else condition_mask
    for t in tqdm(scheduler.timesteps, disable=not progress, desc="diffusion", leave=False):
        x = latents if model_input is None else model_input(latents)
        x = torch.cat([x, x]) if use_cfg else x
        v = transformer(x, encoder_hidden_states=cond, encoder_attention_mask=mask, timestep=t.expand(x.shape[0])).sample[:, :, :, : latents.shape[-1]]
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        latents = scheduler.step(v, t, latents).prev_sample
    return latents
