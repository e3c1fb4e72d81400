"""The connector: maps the AR model's last-layer hidden states over the image span to the diffusion
transformer's conditioning width D.

Linear(hidden -> D) -> GELU(tanh) -> Linear(D -> D) -> RMSNorm, with the RMSNorm weight initialised to
sqrt(5.5) as in the official model (it matches the scale of the text-encoder features SANA was trained on).
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

RMSNORM_INIT = math.sqrt(5.5)


class Connector(ModelMixin, ConfigMixin):
    """Args: hidden_size (AR hidden width), width (D, the diffusion transformer's caption_channels), eps."""

    @register_to_config
    def __init__(self, hidden_size: int, width: int, eps: float = 1e-6):
        super().__init__()
        self.proj_in = nn.Linear(hidden_size, width)
        self.act = nn.GELU(approximate="tanh")
        self.proj_out = nn.Linear(width, width)
        self.norm = nn.RMSNorm(width, eps=eps)
        nn.init.constant_(self.norm.weight, RMSNORM_INIT)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, hidden) -> (B, L, width)."""
        return self.norm(self.proj_out(self.act(self.proj_in(hidden_states))))
