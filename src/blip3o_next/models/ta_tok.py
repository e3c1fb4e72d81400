"""TA-Tok, BLIP3o-NEXT's image tokenizer (csuhan/Tar `tok/ta_tok.py`): SigLIP2 features -> a task layer -> SimVQ
codes aligned with language. Here it encodes only (a converted release's edit references); its weights come from a
local file through `released_checkpoint.py`, never from the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import AutoConfig, SiglipVisionModel, Siglip2VisionConfig, Siglip2VisionModel

from .image_tokenizer import GridCodes


class TATok(GridCodes, ModelMixin, ConfigMixin):
    """TA-Tok (csuhan/Tar `tok/ta_tok.py`) with its parameter names, as BLIP3o-NEXT's image tokenizer: images in
    [-1, 1] at `image_size` -> `grid`**2 codebook indices, deterministically (BLIP3o-NEXT's setting).

    Args: encoder_config (the SigLIP2 teacher's vision config as a dict), image_size (px of the images it is given;
    resized to the encoder's own size), bottleneck_dim, codebook_size, l2_normalized / stochastic /
    learnable_temperature (SimVQ settings from ta_tok.pth), select_layer_id, decoder_depth. The feature decoder is kept
    so that every key of the file has a home; it reconstructs SigLIP features, not pixels, so no preview is drawn."""

    @register_to_config
    def __init__(self, encoder_config: dict, image_size: int, bottleneck_dim: int, codebook_size: int, l2_normalized: bool = True,
                 stochastic: bool = False, learnable_temperature: bool = False, select_layer_id: int = -2, decoder_depth: int = 3):
        super().__init__()
        vision = AutoConfig.for_model(**encoder_config)
        if vision.model_type != "siglip_vision_model":
            raise ValueError(f"TA-Tok's encoder takes pixel tensors, so its teacher must be a fixed-resolution SigLIP(2) (model_type siglip), got {vision.model_type}")
        self.encoder = SiglipVisionModel(vision)  # the names of TA-Tok's `AutoModel.from_config(teacher).vision_model`
        width = vision.hidden_size
        self.encode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.decode_task_layer = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, width))
        self.decoder = Siglip2VisionModel(Siglip2VisionConfig(patch_size=1, num_hidden_layers=decoder_depth, num_channels=bottleneck_dim, hidden_size=width))
        self.bottleneck = nn.Module()
        self.bottleneck.in_linear = nn.Linear(width, bottleneck_dim)
        self.bottleneck.out_linear = nn.Linear(bottleneck_dim, width)
        self.bottleneck.regularizer = nn.Module()
        self.bottleneck.regularizer.embedding = nn.Embedding(codebook_size, bottleneck_dim)
        self.bottleneck.regularizer.embedding_proj = nn.Linear(bottleneck_dim, bottleneck_dim)
        if learnable_temperature:  # SimVQ's learnable temperature; deterministic codes do not use it
            self.bottleneck.regularizer.stochastic_temperature_inv = nn.Parameter(torch.tensor(10.0))

    @property
    def input_size(self) -> int:
        return self.encoder.config.image_size

    @property
    def grid(self) -> int:
        return self.input_size // self.encoder.config.patch_size

    def codebook(self) -> torch.Tensor:
        """(codebook_size, bottleneck_dim) code vectors, normalised when the codebook is."""
        reg = self.bottleneck.regularizer
        emb = reg.embedding_proj(reg.embedding.weight)
        return F.normalize(emb, dim=-1) if self.config.l2_normalized else emb

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, grid*grid), row-major: the nearest code (by cosine when the
        codebook is normalised, which is SimVQ's deterministic choice when sampling is stochastic)."""
        if images.shape[-1] != self.input_size or images.shape[-2] != self.input_size:
            images = F.interpolate(images, size=(self.input_size, self.input_size), mode="bicubic", antialias=True, align_corners=False)
        feats = self.encoder(images.to(self.dtype), output_hidden_states=True).hidden_states[self.config.select_layer_id]
        z = self.bottleneck.in_linear(self.encode_task_layer(feats)).float()
        emb = self.codebook().float()
        if self.config.l2_normalized:
            return (F.normalize(z, dim=-1) @ emb.T).argmax(-1)
        return torch.cdist(z, emb[None].expand(z.shape[0], -1, -1)).argmin(-1)
