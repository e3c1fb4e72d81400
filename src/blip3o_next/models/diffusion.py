"""The diffusion side: diffusers' SanaTransformer2DModel on VAE latents, trained by flow matching and sampled
with FlowMatchEulerDiscreteScheduler under classifier-free guidance.

Flow matching (as in SANA / BLIP3o-NEXT): x_t = (1 - sigma) x0 + sigma * noise with sigma ~ U(0, 1) or, as in SD3
and SANA's training, sigma = sigmoid(N(0, 1)) ("logit_normal": most draws at mid noise, where layout and shape are
decided); the network predicts the velocity noise - x0 at timestep sigma * num_train_timesteps. The unconditional branch of
CFG is the all-zero condition (the connector's output zeroed), which training shows with probability
`condition_dropout`, so that training and sampling see the same unconditional input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

Generators = torch.Generator | list[torch.Generator] | None  # a list gives each sample its own stream
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


@dataclass
class Condition:
    """What the diffusion transformer is conditioned on.

    `tokens` (B, L, D) are cross-attended to (`mask` (B, L) marks the valid ones; None = all). `spatial`
    (B, C, H, W), when the model has a spatial path, is concatenated to the transformer's input channels.

    For editing, the reference image's VAE latents enter two ways (docs/design.md#official-editing): `reference_tokens`
    (B, R, D), its projected latents, are cross-attended to after `tokens`; `reference` (B, C, H, W) latents are
    concatenated to the noisy latents along the width, and the output's reference half is discarded (the official
    form), or `reference_channels` (B, C, H, W) along the channels. CFG's unconditional branch keeps all three
    (it zeroes only the instruction's blueprint), so guidance strengthens the edit while both branches agree on
    the untouched pixels.
    """

    tokens: torch.Tensor
    mask: torch.Tensor | None = None
    spatial: torch.Tensor | None = None
    reference: torch.Tensor | None = None
    reference_tokens: torch.Tensor | None = None
    reference_channels: torch.Tensor | None = None

    def zeroed(self, keep: torch.Tensor | None = None) -> "Condition":
        """The condition with samples where `keep` (B,) is False set to zero (all of them when `keep` is None).
        The mask and the reference image are kept."""
        keep = torch.zeros(self.tokens.shape[0], dtype=torch.bool, device=self.tokens.device) if keep is None else keep
        zero = lambda t: None if t is None else t * keep.view(-1, *([1] * (t.ndim - 1))).to(t.dtype)  # noqa: E731
        return Condition(zero(self.tokens), self.mask, zero(self.spatial), self.reference, self.reference_tokens, self.reference_channels)

    def select(self, index: torch.Tensor) -> "Condition":
        """The samples at `index` (a 1-D index tensor)."""
        return Condition(*(None if t is None else t[index] for t in _fields(self)))

    def with_unconditional(self) -> "Condition":
        """[zero condition; condition] stacked on the batch axis: one transformer call serves both CFG branches."""
        uncond = self.zeroed()
        return Condition(*(None if a is None else torch.cat([a, b]) for a, b in zip(_fields(uncond), _fields(self))))

    def cross_attention_inputs(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The sequence the transformer cross-attends to (the tokens, then any reference tokens) and its mask."""
        if self.reference_tokens is None:
            return self.tokens, self.mask
        tokens = torch.cat([self.tokens, self.reference_tokens.to(self.tokens.dtype)], 1)
        if self.mask is None:
            return tokens, None
        return tokens, torch.cat([self.mask, self.mask.new_ones(self.reference_tokens.shape[:2])], 1)


def _fields(c: Condition) -> tuple:
    return (c.tokens, c.mask, c.spatial, c.reference, c.reference_tokens, c.reference_channels)


def uniform(n: int, generator: Generators, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """n draws from U(0, 1); with a list of generators, draw i comes from generator i (independent of batching)."""
    if isinstance(generator, list):
        return torch.cat([torch.rand(1, generator=g) for g in generator]).to(device, dtype)
    return torch.rand(n, generator=generator).to(device, dtype)


def training_sigmas(n: int, generator: Generators, device: torch.device, dtype: torch.dtype, sampling: str = "uniform") -> torch.Tensor:
    """n noise levels in (0, 1) drawn as `sampling` says (see the module docstring), per-sample generators as `uniform`."""
    if sampling == "uniform":
        return uniform(n, generator, device, dtype)
    if sampling != "logit_normal":
        raise ValueError(f"timestep sampling must be one of {', '.join(TIMESTEP_SAMPLINGS)}, got {sampling!r}")
    if isinstance(generator, list):
        normal = torch.cat([torch.randn(1, generator=g) for g in generator])
    else:
        normal = torch.randn(n, generator=generator)
    return torch.sigmoid(normal).to(device, dtype)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - sigma) x0 + sigma * noise, sigma per sample."""
    s = sigmas.view(-1, *([1] * (latents.ndim - 1)))
    return (1.0 - s) * latents + s * noise


def drop_condition(condition: Condition, probability: float, generator: Generators = None) -> Condition:
    """Zero each sample's condition with `probability` (teaches the unconditional branch used by CFG)."""
    if probability <= 0:
        return condition
    return condition.zeroed(uniform(condition.tokens.shape[0], generator, condition.tokens.device) >= probability)


def predict_velocity(transformer: SanaTransformer2DModel, x: torch.Tensor, condition: Condition, timestep: torch.Tensor) -> torch.Tensor:
    """The transformer's velocity for latents `x` (B, C, H, W) at `timestep` (B,) under `condition`."""
    width = x.shape[-1]
    if condition.spatial is not None:
        x = torch.cat([x, condition.spatial.to(x.dtype)], dim=1)
    if condition.reference_channels is not None:
        x = torch.cat([x, condition.reference_channels.to(x.dtype)], dim=1)
    if condition.reference is not None:  # noise-space injection: [noisy | reference] along the width
        reference = condition.reference.to(x.dtype)
        padding = x.new_zeros(reference.shape[0], x.shape[1] - reference.shape[1], *reference.shape[2:])  # no spatial map there
        x = torch.cat([x, torch.cat([reference, padding], dim=1)], dim=-1)
    tokens, mask = condition.cross_attention_inputs()
    return transformer(x, encoder_hidden_states=tokens, encoder_attention_mask=mask, timestep=timestep).sample[..., :width]


def flow_matching_loss(
    transformer: SanaTransformer2DModel,
    latents: torch.Tensor,
    condition: Condition,
    num_train_timesteps: int = 1000,
    generator: Generators = None,
    timestep_sampling: str = "uniform",
) -> torch.Tensor:
    """MSE between the predicted and true velocity at noise levels drawn by `timestep_sampling`."""
    sigmas = training_sigmas(latents.shape[0], generator, latents.device, latents.dtype, timestep_sampling)
    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    pred = predict_velocity(transformer, noisy_latents(latents, noise, sigmas), condition, sigmas * num_train_timesteps)
    return F.mse_loss(pred.float(), (noise - latents).float())


@torch.no_grad()
def sample_latents(
    transformer: SanaTransformer2DModel,
    scheduler_config: dict,
    condition: Condition,
    latent_shape: tuple[int, int, int],
    num_steps: int = 30,
    guidance_scale: float = 2.0,
    generator: Generators = None,
    latents: torch.Tensor | None = None,
    progress: bool = False,
    known: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Euler flow-matching sampling from noise, guided by `condition` against the zero condition.

    `known` = (clean latents, mask (B, 1, H, W), 1 = known) fixes part of the image (blended latent diffusion):
    after every step the known cells are put back on the straight path from the starting noise to the clean
    latents, at the step's noise level, so they end exactly at the clean latents and the rest is generated to
    match them. A fresh scheduler is built from `scheduler_config` on every call, so sampling shares no mutable
    state.
    """
    tokens = condition.tokens
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_steps, device=tokens.device)
    if latents is None:
        latents = randn_tensor((tokens.shape[0], *latent_shape), generator=generator, device=tokens.device, dtype=tokens.dtype)
    use_cfg = guidance_scale != 1.0
    cond = condition.with_unconditional() if use_cfg else condition
    noise = latents
    if known is not None:  # converted once, not in every step
        clean, mask = (k.to(latents.dtype) for k in known)
    for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="diffusion", leave=False)):
        x = torch.cat([latents, latents]) if use_cfg else latents
        v = predict_velocity(transformer, x, cond, t.expand(x.shape[0]))
        if use_cfg:
            v_uncond, v_cond = v.chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        latents = scheduler.step(v, t, latents).prev_sample
        if known is not None:
            sigma = scheduler.sigmas[i + 1]
            latents = torch.lerp(latents, (1.0 - sigma) * clean + sigma * noise, mask)
    return latents
