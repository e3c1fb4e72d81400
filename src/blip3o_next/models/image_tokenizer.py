"""The discrete image tokenizer (the "blueprint"): image -> grid of codebook indices, and back to pixels.

Official BLIP3o-NEXT uses TA-Tok, a vector-quantised SigLIP2 whose codes are semantic (text-aligned) rather
than reconstruction codes. Without a pretrained vision tower, the tiny tokenizer gets semantic codes from an
auxiliary objective: from each cell's quantised code it must predict the scene content of that cell
(color class and shape class, read from the ShapeWorld scene) and, pooled, the background. A small pixel
decoder is trained alongside for previews of the blueprint.

Quantisation uses vector-quantize-pytorch (EMA codebook, dead-code replacement).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from ..shapeworld.render import shape_alpha, text_alpha
from ..shapeworld.world import BACKGROUNDS, COLORS, SHAPES, Scene

# Cell classes of the semantic objective: 0 = background, then the palette / the shapes, last = text.
NUM_COLOR_CLASSES = 1 + len(COLORS) + 1
NUM_SHAPE_CLASSES = 1 + len(SHAPES) + 1
CELL_COVERAGE = 0.2  # an object labels a cell when it covers at least this share of it


def cell_labels(scene: Scene, grid: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell (color class, shape class) of a scene on a grid x grid partition of its canvas."""
    S = scene.canvas
    cell = S // grid
    n_objects = len(scene.objects) + (scene.text is not None)
    coverage = np.zeros((n_objects + 1, S, S), np.float32)
    colors, shapes = [0], [0]
    for i, o in enumerate(scene.objects, start=1):
        x0, y0, a = shape_alpha(o, S)
        coverage[i, y0 : y0 + a.shape[0], x0 : x0 + a.shape[1]] = a
        colors.append(1 + list(COLORS).index(o.color))
        shapes.append(1 + SHAPES.index(o.shape))
    if scene.text is not None:
        x0, y0, a = text_alpha(scene.text, S)
        coverage[-1, y0 : y0 + a.shape[0], x0 : x0 + a.shape[1]] = a
        colors.append(NUM_COLOR_CLASSES - 1)
        shapes.append(NUM_SHAPE_CLASSES - 1)
    per_cell = coverage[:, : grid * cell, : grid * cell].reshape(n_objects + 1, grid, cell, grid, cell).mean(axis=(2, 4))
    per_cell[0] = CELL_COVERAGE  # background wins unless an object covers enough of the cell
    owner = per_cell.argmax(axis=0)
    return np.asarray(colors)[owner], np.asarray(shapes)[owner]


def background_label(scene: Scene) -> int:
    return list(BACKGROUNDS).index(scene.background)


def token_grid(image_size: int, patch_size: int, channels: tuple[int, ...]) -> int:
    """Side of the token grid: the patch stem divides by patch_size, each later stage by 2."""
    return image_size // (patch_size * 2 ** (len(channels) - 1))


class ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels at each position of a (B, C, H, W) map. Unlike GroupNorm, whose statistics
    span the whole image, it keeps a cell's code independent of distant content (torch has no 2-D form)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def norm_layer(kind: str, channels: int) -> nn.Module:
    """`group`: GroupNorm(8), image-wide statistics; `channel`: per-position ChannelNorm."""
    if kind == "group":
        return nn.GroupNorm(8, channels)
    if kind == "channel":
        return ChannelNorm(channels)
    raise ValueError(f"unknown norm {kind!r} (expected 'group' or 'channel')")


class ResBlock(nn.Module):
    def __init__(self, channels: int, norm: str = "group", kernel_size: int = 3):
        super().__init__()
        pad = kernel_size // 2
        self.block = nn.Sequential(
            norm_layer(norm, channels), nn.SiLU(), nn.Conv2d(channels, channels, kernel_size, padding=pad),
            norm_layer(norm, channels), nn.SiLU(), nn.Conv2d(channels, channels, kernel_size, padding=pad),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


@dataclass
class ImageTokenizerOutput:
    loss: torch.Tensor | None
    indices: torch.Tensor  # (B, grid*grid)
    reconstruction: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    losses: dict[str, float]  # the parts of the loss, for logging


class GridCodes:
    """What the model reads from a tokenizer whose codes fill a square `grid` from one codebook (this project's VQ
    tokenizer, TA-Tok): the number of tokens per image and the codebook's size."""

    grid: int
    config: dict

    @property
    def num_tokens(self) -> int:
        return self.grid**2

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size


class ImageTokenizer(GridCodes, ModelMixin, ConfigMixin):
    """VQ image tokenizer with a semantic auxiliary head and a preview decoder.

    Args:
        image_size: input side in px.
        patch_size: side of the non-overlapping patches the first layer embeds (a cheap stem: no layer runs
            at full resolution).
        channels: encoder widths; each stage after the first halves the resolution, so the grid is
            image_size / (patch_size * 2**(len(channels) - 1)).
        code_dim: dimension of the quantised codes.
        codebook_size: number of codes (image-token vocabulary).
        commitment_weight, ema_decay, dead_code_threshold: VQ settings (vector-quantize-pytorch).
        semantic_weight, reconstruction_weight: loss weights.
        norm: `group` (GroupNorm: every code depends on the whole image's statistics, so an edit anywhere changes
            codes everywhere) or `channel` (per-position: an edit changes only the codes near it).
        encoder_kernel_size: kernel of the encoder's residual blocks; 1 keeps each code's receptive field to about
            two cells (16 px at the tiny preset) instead of the whole image. The tiny recipe uses `channel` with
            kernel 1 (configs/tiny/1_image_tokenizer.yaml); the defaults are the older form, which checkpoints saved
            before these options existed were trained with.
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 4,
        channels: tuple[int, ...] = (64, 128),
        code_dim: int = 32,
        codebook_size: int = 512,
        commitment_weight: float = 0.25,
        ema_decay: float = 0.95,
        dead_code_threshold: int = 2,
        semantic_weight: float = 1.0,
        reconstruction_weight: float = 1.0,
        norm: str = "group",
        encoder_kernel_size: int = 3,
    ):
        super().__init__()
        channels = tuple(channels)  # JSON configs hand back lists
        enc: list[nn.Module] = [nn.Conv2d(3, channels[0], patch_size, stride=patch_size)]
        for c_in, c_out in zip(channels, channels[1:]):
            enc += [ResBlock(c_in, norm, encoder_kernel_size), nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)]
        enc += [ResBlock(channels[-1], norm, encoder_kernel_size), norm_layer(norm, channels[-1]), nn.SiLU(), nn.Conv2d(channels[-1], code_dim, 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = VectorQuantize(
            dim=code_dim, codebook_size=codebook_size, decay=ema_decay, commitment_weight=commitment_weight,
            threshold_ema_dead_code=dead_code_threshold, kmeans_init=True, accept_image_fmap=True,
        )
        dec: list[nn.Module] = [nn.Conv2d(code_dim, channels[-1], 3, padding=1)]
        rev = tuple(reversed(channels))
        for c_in, c_out in zip(rev, rev[1:]):
            dec += [ResBlock(c_in, norm), nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1)]
        dec += [ResBlock(rev[-1], norm), norm_layer(norm, rev[-1]), nn.SiLU(), nn.Conv2d(rev[-1], 3 * patch_size**2, 3, padding=1), nn.PixelShuffle(patch_size)]
        self.decoder = nn.Sequential(*dec)
        self.cell_head = nn.Conv2d(code_dim, NUM_COLOR_CLASSES + NUM_SHAPE_CLASSES, 1)
        self.background_head = nn.Linear(code_dim, len(BACKGROUNDS))

    @property
    def grid(self) -> int:
        return token_grid(self.config.image_size, self.config.patch_size, self.config.channels)

    def _quantize(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if images.shape[-1] != self.config.image_size or images.shape[-2] != self.config.image_size:
            raise ValueError(f"expected {self.config.image_size}px images, got {tuple(images.shape[-2:])}")
        codes, indices, commit = self.quantizer(self.encoder(images))  # (B, D, g, g), (B, g, g)
        return codes, indices.flatten(1), commit

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> code indices (B, grid*grid), row-major."""
        return self._quantize(images)[1]

    def codes_from_indices(self, indices: torch.Tensor) -> torch.Tensor:
        codes = self.quantizer.get_output_from_indices(indices)  # (B, D, g*g): channel-first for image fmaps
        return codes.reshape(indices.shape[0], -1, self.grid, self.grid)

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Code indices (B, grid*grid) -> preview images (B, 3, H, W) in [-1, 1]."""
        return self.decoder(self.codes_from_indices(indices)).clamp(-1, 1)

    def forward(
        self,
        images: torch.Tensor,
        color_labels: torch.Tensor | None = None,
        shape_labels: torch.Tensor | None = None,
        background_labels: torch.Tensor | None = None,
    ) -> ImageTokenizerOutput:
        """Encode, quantise and decode; with labels, also return the training loss."""
        codes, indices, commit = self._quantize(images)
        reconstruction = self.decoder(codes)
        if color_labels is None:
            return ImageTokenizerOutput(None, indices, reconstruction, {})
        cfg = self.config
        recon = F.mse_loss(reconstruction, images)
        cell_logits = self.cell_head(codes)  # (B, C+K, g, g)
        sem = F.cross_entropy(cell_logits[:, :NUM_COLOR_CLASSES], color_labels) + F.cross_entropy(
            cell_logits[:, NUM_COLOR_CLASSES:], shape_labels
        )
        sem = sem + F.cross_entropy(self.background_head(codes.mean(dim=(2, 3))), background_labels)
        commit = commit.sum()
        loss = cfg.reconstruction_weight * recon + cfg.semantic_weight * sem + commit
        parts = {"reconstruction": recon.item(), "semantic": sem.item(), "commitment": commit.item()}
        return ImageTokenizerOutput(loss, indices, reconstruction, parts)


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3)."""
    return x.clamp(-1, 1).add(1).mul(127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


def semantic_batch(scenes: list[Scene], grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Label tensors (color (B,g,g), shape (B,g,g), background (B,)) for the semantic objective."""
    labels = [cell_labels(s, grid) for s in scenes]
    colors = torch.as_tensor(np.stack([c for c, _ in labels]), dtype=torch.long)
    shapes = torch.as_tensor(np.stack([s for _, s in labels]), dtype=torch.long)
    backgrounds = torch.as_tensor([background_label(s) for s in scenes], dtype=torch.long)
    return colors, shapes, backgrounds
