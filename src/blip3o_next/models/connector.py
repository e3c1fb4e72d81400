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

Optionally (`footprint_channels` > 0; a semantic blueprint) the state of each token that draws something (a shape
or text anchor, a letter) is also painted over the latent cells of the box it draws in (decoded from the tokens:
`semantic_blueprint.object_boxes`), with each cell's offset from the box centre in half-sides. A semantic blueprint
names an object at one cell and a letter in a slot; the transformer then need not learn through attention how far an
object reaches, where its edges and corners are, or where each glyph goes.
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
    (channels of the spatial map; 0 = none, as in the official model), footprint_channels (channels of the
    object-footprint map, which adds 2 more for the offsets; 0 = none)."""

    @register_to_config
    def __init__(self, hidden_size: int, width: int, eps: float = 1e-6, num_positions: int = 0, spatial_channels: int = 0, footprint_channels: int = 0):
        super().__init__()
        self.spatial_proj = nn.Linear(hidden_size, spatial_channels) if spatial_channels else None
        self.footprint_proj = nn.Linear(hidden_size, footprint_channels) if footprint_channels else None
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

    @property
    def map_channels(self) -> int:
        """Input channels the spatial and footprint maps add to the diffusion transformer's."""
        return self.config.spatial_channels + (self.config.footprint_channels + 2 if self.config.footprint_channels else 0)

    def footprint_map(self, token_states: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, side: int, canvas: int) -> torch.Tensor:
        """(B, footprint_channels + 2, side, side): over each box, its token's state projected, plus the latent
        cell's (x, y) offset from the box centre divided by the half side (summed where boxes overlap).

        token_states (B, N, hidden) of the blueprint's tokens; boxes (B, K, 5) = (token position, cx, cy, half
        width, half height) in px of a `canvas` px image; valid (B, K) marks real boxes."""
        if self.footprint_proj is None:
            raise ValueError("this connector has no footprint path (footprint_channels = 0)")
        token, centre, half = boxes[..., 0].long(), boxes[..., 1:3], boxes[..., 3:5].clamp(min=1.0)
        states = self.footprint_proj(token_states).gather(1, token[..., None].expand(-1, -1, self.config.footprint_channels))
        step = canvas / side
        grid = (torch.arange(side, device=boxes.device, dtype=boxes.dtype) + 0.5) * step
        rel = (grid - centre[..., None]) / half[..., None]  # (B, K, 2, side): x then y
        inside = (rel.abs() <= 1 + step / half[..., None]).to(states.dtype)  # a cell's reach: one cell beyond the box
        inside = inside[:, :, 1, :, None] * inside[:, :, 0, None, :] * valid[..., None, None].to(states.dtype)  # (B, K, y, x)
        painted = torch.einsum("bkc,bkyx->bcyx", states, inside)
        rel_x = (rel[:, :, 0, None, :].to(states.dtype) * inside).sum(1)
        rel_y = (rel[:, :, 1, :, None].to(states.dtype) * inside).sum(1)
        return torch.cat([painted, rel_x[:, None], rel_y[:, None]], dim=1)
