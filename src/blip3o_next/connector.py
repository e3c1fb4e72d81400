"""The connector: maps the AR model's last-layer hidden states over the image span to the diffusion
transformer's conditioning width D.

Linear(hidden -> D) -> GELU(tanh) -> Linear(D -> D) -> RMSNorm, with the RMSNorm weight initialised to
sqrt(5.5) as in the official model (it matches the scale of the text-encoder features SANA was trained on).

Optionally (`num_positions` > 0; the tiny preset) a learned embedding per span position is added to the input.
A small model trained briefly cannot recover from the AR hidden states alone which image cell each token
describes, and the diffusion transformer's cross-attention needs that to put things in the right place.

Optionally (`spatial_channels` > 0; the tiny preset) the image tokens' hidden states are also projected to a
map on the token grid, resized to the latent grid, that the diffusion transformer reads as extra input channels.
Cross-attention alone had to discover the token-cell -> latent-cell alignment, and within the CPU training
budget it did not (teacher-forced blueprints rendered the right colors in the wrong places); the map gives
that alignment by construction. The official model has no such path.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

RMSNORM_INIT = math.sqrt(5.5)


class Connector(ModelMixin, ConfigMixin):
    """Args: hidden_size (AR hidden width), width (D, the diffusion transformer's caption_channels), eps,
    num_positions (learned span-position embeddings; 0 = none, as in the official model), spatial_channels
    (channels of the spatial map; 0 = none, as in the official model)."""

    @register_to_config
    def __init__(self, hidden_size: int, width: int, eps: float = 1e-6, num_positions: int = 0, spatial_channels: int = 0):
        super().__init__()
        self.spatial_proj = nn.Linear(hidden_size, spatial_channels) if spatial_channels else None
        self.position_embedding = nn.Embedding(num_positions, hidden_size) if num_positions else None
        if self.position_embedding is not None:
            nn.init.normal_(self.position_embedding.weight, std=0.02)
        self.proj_in = nn.Linear(hidden_size, width)
        self.act = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(width, width)
        self.norm = nn.RMSNorm(width, eps=eps)
        nn.init.constant_(self.norm.weight, RMSNORM_INIT)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, width)."""
        if self.position_embedding is not None:
            if hidden_states.shape[1] > self.config.num_positions:
                raise ValueError(f"the condition has {hidden_states.shape[1]} positions; the connector embeds at most {self.config.num_positions}")
            hidden_states = hidden_states + self.position_embedding.weight[: hidden_states.shape[1]].to(hidden_states.dtype)
        return self.norm(self.proj_out(self.act(self.proj_in(hidden_states))))

    def spatial_map(self, image_hidden_states: torch.Tensor, side: int) -> torch.Tensor:
        """(B, g*g, hidden) hidden states of the image tokens in raster order -> (B, spatial_channels, side, side)."""
        if self.spatial_proj is None:
            raise ValueError("this connector has no spatial path (spatial_channels = 0)")
        b, n, _ = image_hidden_states.shape
        grid = math.isqrt(n)
        if grid * grid != n:
            raise ValueError(f"{n} image tokens do not form a square grid")
        x = self.spatial_proj(image_hidden_states).transpose(1, 2).reshape(b, -1, grid, grid)
        return F.interpolate(x, size=(side, side), mode="nearest")
