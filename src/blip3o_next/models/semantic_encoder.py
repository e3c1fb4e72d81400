"""The learned half of the semantic image tokenizer: pixels -> semantic blueprint (`semantic_blueprint.py`).

The codec turns a known scene into its blueprint exactly; this network reads the blueprint off an image whose scene
is unknown: an edit's reference image, or a generated image. It is trained on data-engine renders, clean and
degraded as generated images are, with the exact blueprints of their scenes as labels.

Shape: a small convolutional stem takes the 64 px image down to the blueprint's 8 x 8 cell grid (each cell feature
sees its neighbours, so an object's extent and exact centre are in view), then a transformer reads one token per
blueprint position: a background query, the 64 cells, and one query per letter slot (which must look across the
word's cells). Each position predicts the *factors* of its token (kind, shape, color, size, dx, dy, ink, cap height,
letter) rather than one of the ~49k ids, so every head is small and each factor is learned from every object.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .image_tokenizer import images_to_tensor
from .semantic_blueprint import BlueprintConfig, SemanticVocab, TokenKind, preview, ravel

CELL_KINDS = (TokenKind.EMPTY, TokenKind.SHAPE, TokenKind.TEXT)  # what a cell may hold, in the kind head's order
CELL_FACTORS = ("shape", "color", "size", "dx", "dy", "ink", "cap")
EDGE_THRESHOLD = 0.15  # shape probability that makes a cell a shape when it is its neighbourhood's peak (cell_kinds)


@dataclass
class SemanticEncoderOutput:
    loss: torch.Tensor | None
    logits: dict[str, torch.Tensor]  # per head: (B, positions, classes)
    losses: dict[str, float]  # the parts of the loss, for logging


def _neighbourhood(values: torch.Tensor, outside: float) -> torch.Tensor:
    """(B, cells) values on a square grid -> (B, cells, 9): each cell's 3 x 3 neighbourhood (itself included),
    `outside` beyond the grid's edge."""
    b, cells = values.shape
    side = math.isqrt(cells)
    padded = F.pad(values.view(b, 1, side, side), (1, 1, 1, 1), value=outside)
    return F.unfold(padded, 3).transpose(1, 2)


class LetterReader(nn.Module):
    """Letter slots (B, slots, width) cross-attend to a finer feature map (B, side*side, C) with learned positions,
    then an MLP; both residual and zero-initialised, so an encoder without it loads into one with it unchanged."""

    def __init__(self, channels: int, width: int, heads: int, positions: int):
        super().__init__()
        self.project = nn.Linear(channels, width)
        self.position = nn.Parameter(torch.randn(1, positions, width) * 0.02)
        self.norm_query, self.norm_map, self.norm_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        for layer in (self.attention.out_proj, self.mlp[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, letters: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
        keys = self.norm_map(self.project(fine) + self.position)
        letters = letters + self.attention(self.norm_query(letters), keys, keys, need_weights=False)[0]
        return letters + self.mlp(self.norm_mlp(letters))


class ResBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(nn.GroupNorm(8, channels), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1),
                                   nn.GroupNorm(8, channels), nn.GELU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class SemanticEncoder(ModelMixin, ConfigMixin):
    """Image -> semantic blueprint ids.

    Args:
        image_size: input side in px; must be the blueprint's canvas.
        grid: blueprint cells per side (the stem halves the resolution log2(image_size / grid) times).
        channels: stem widths, one per resolution from image_size down to grid.
        width, layers, attention_heads: the transformer over the blueprint positions.
        letter_slots, offset_bins: the blueprint's (see `BlueprintConfig`).
        letter_reader_layers: cross-attention layers through which the letter slots read the stem's finer map at
            `letter_reader_side` x `letter_reader_side` (one of its resolutions); 0: letters read the 8 px cells alone.
            Glyphs are 10-14 px tall, too fine for 8 px cell features (docs/semantic_blueprint.md, "Reading words").
    """

    @register_to_config
    def __init__(
        self,
        image_size: int = 64,
        grid: int = 8,
        channels: tuple[int, ...] = (32, 64, 96, 160),
        width: int = 160,
        layers: int = 3,
        attention_heads: int = 4,
        letter_slots: int = 4,
        offset_bins: int = 8,
        letter_reader_layers: int = 0,
        letter_reader_side: int = 16,
    ):
        super().__init__()
        self.vocab = SemanticVocab(BlueprintConfig(canvas=image_size, grid=grid, offset_bins=offset_bins, letter_slots=letter_slots))
        if image_size // grid != 2 ** (len(channels) - 1):
            raise ValueError(f"{len(channels)} stem widths halve {image_size} px {len(channels) - 1} times, not to a {grid}-cell grid")
        stem: list[nn.Module] = [nn.Conv2d(3, channels[0], 3, padding=1), nn.GELU()]
        for c_in, c_out in zip(channels, channels[1:]):
            stem += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), ResBlock(c_out)]
        stem += [nn.GroupNorm(8, channels[-1]), nn.GELU(), nn.Conv2d(channels[-1], width, 1)]
        self.stem = nn.Sequential(*stem)
        sides = [image_size // 2**i for i in range(len(channels))]
        if letter_reader_layers and letter_reader_side not in sides[1:]:
            raise ValueError(f"letter_reader_side must be one of the stem's resolutions {sides[1:]}, got {letter_reader_side}")
        # the stem module after which the map at letter_reader_side is ready: its ResBlock at that resolution
        self.letter_map_index = 1 + 2 * sides.index(letter_reader_side) if letter_reader_layers else None
        self.letter_reader = nn.ModuleList(
            LetterReader(channels[sides.index(letter_reader_side)], width, attention_heads, letter_reader_side**2) for _ in range(letter_reader_layers)
        )
        n = self.vocab.config.seq_len
        self.queries = nn.Parameter(torch.randn(1, 1 + letter_slots, width) * 0.02)  # background and letter slots
        self.position = nn.Parameter(torch.randn(1, n, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, attention_heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        cards = self.vocab.factor_cardinalities()
        self.readout = nn.ModuleDict({
            "background": nn.Linear(width, cards["background"]),
            "kind": nn.Linear(width, len(CELL_KINDS)),
            **{name: nn.Linear(width, cards[name]) for name in CELL_FACTORS},
            "letter": nn.Linear(width, cards["letter"] + 1),  # + PAD
        })
        table = self.vocab.factor_table()
        for name in ("kind", *CELL_FACTORS, "background", "letter"):  # id -> factor lookups for the labels (not saved)
            self.register_buffer(f"table_{name}", torch.from_numpy(np.array(table[name])), persistent=False)

    # ------------------------------------------------------------------ forward

    def forward(self, images: torch.Tensor, ids: torch.Tensor | None = None) -> SemanticEncoderOutput:
        """images: (B, 3, H, W) in [-1, 1]; ids: (B, N) true blueprints, for the loss."""
        x, fine = images, None
        for i, module in enumerate(self.stem):
            x = module(x)
            if i == self.letter_map_index:
                fine = x.flatten(2).transpose(1, 2)  # (B, side*side, C): the map the letters read
        cells = x.flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        b, slots = cells.shape[0], self.config.letter_slots
        queries = self.queries.expand(b, -1, -1)
        tokens = torch.cat([queries[:, :1], cells, queries[:, 1:]], dim=1) + self.position
        h = self.norm(self.transformer(tokens))
        bg, cell, letters = h[:, :1], h[:, 1:-slots], h[:, -slots:]
        for reader in self.letter_reader:
            letters = reader(letters, fine)
        logits = {"background": self.readout["background"](bg), "letter": self.readout["letter"](letters),
                  **{name: self.readout[name](cell) for name in ("kind", *CELL_FACTORS)}}
        if ids is None:
            return SemanticEncoderOutput(None, logits, {})
        loss, losses = self._loss(logits, ids)
        return SemanticEncoderOutput(loss, logits, losses)

    def _targets(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per head, the class of every position (-100 where the head does not apply)."""
        slots = self.config.letter_slots
        cell_ids, letter_ids = ids[:, 1:-slots], ids[:, -slots:]
        kind = self.table_kind[cell_ids]
        kind_class = torch.full_like(kind, -100)
        for i, k in enumerate(CELL_KINDS):
            kind_class[kind == k] = i
        letter = self.table_letter[letter_ids]
        targets = {"background": self.table_background[ids[:, :1]], "kind": kind_class,
                   "letter": torch.where(letter >= 0, letter, self.readout["letter"].out_features - 1)}
        for name in CELL_FACTORS:
            value = getattr(self, f"table_{name}")[cell_ids]
            targets[name] = torch.where(value >= 0, value, -100)
        return targets

    def _loss(self, logits: dict[str, torch.Tensor], ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Sum of the heads' cross-entropies, each averaged over the positions where it applies."""
        targets = self._targets(ids)
        parts = {}
        for name, target in targets.items():
            if (target != -100).any():
                parts[name] = F.cross_entropy(logits[name].flatten(0, 1).float(), target.flatten(), ignore_index=-100)
        loss = sum(parts.values())
        return loss, {k: v.item() for k, v in parts.items()}

    @property
    def num_tokens(self) -> int:
        """Blueprint length N (positions the AR model writes)."""
        return self.vocab.config.seq_len

    @property
    def codebook_size(self) -> int:
        """Number of ids."""
        return self.vocab.size

    # ------------------------------------------------------------------ reading

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, N) blueprint ids: every head's most likely class, assembled into ids."""
        logits = self(images).logits
        pick = {name: scores.argmax(-1) for name, scores in logits.items()}
        pick["kind"] = self.cell_kinds(logits)
        return self.assemble(pick)

    def cell_kinds(self, logits: dict[str, torch.Tensor], edge_threshold: float = EDGE_THRESHOLD) -> torch.Tensor:
        """(B, cells) index into CELL_KINDS per cell, decided over the scene rather than cell by cell, by three rules of
        the codec's world (measured in docs/semantic_blueprint.md, "Reading the kinds"):

        - At most one word: a word spans 3-6 cells and its centre cell is often ambiguous, so each cell alone may
          say "text" too weakly (or two may). The word is there when its probability summed over the cells is
          >= 0.5, and its anchor is the cell most likely to hold it.
        - An object whose centre lies near a cell edge spreads its probability over two cells, so neither may
          reach 0.5. A cell is a shape when its shape probability is >= 0.5, or >= `edge_threshold` while it is
          the largest of its 3 x 3 neighbourhood and no neighbour is a shape already.
        - The same object is not read twice: a shape cell next to a more probable one of the same shape and color
          is dropped. Two real objects of one shape and color are >= 12 px apart, but they can sit in
          neighbouring cells, so this rule costs the rare such pair one object (measured, net gain)."""
        p = logits["kind"].float().softmax(-1)  # (B, cells, 3): EMPTY, SHAPE, TEXT
        shape, text = p[..., 1], p[..., 2]
        sure = shape >= 0.5
        peak = shape >= _neighbourhood(shape, 0.0).max(-1).values
        kinds = (sure | ((shape >= edge_threshold) & peak & ~_neighbourhood(sure.float(), 0.0).amax(-1).bool())).long()
        identity = (logits["shape"].argmax(-1) * logits["color"].shape[-1] + logits["color"].argmax(-1)).float()
        shape_p = torch.where(kinds == 1, shape, 0.0)
        twice = (_neighbourhood(shape_p, 0.0) > shape_p[..., None]) & (_neighbourhood(identity, -1.0) == identity[..., None])
        kinds = torch.where(twice.any(-1), 0, kinds)
        word = text.sum(1) >= 0.5
        anchor = F.one_hot(text.argmax(1), p.shape[1]).bool() & word[:, None]
        return torch.where(anchor, 2, kinds)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, N) blueprint ids -> their previews (B, 3, H, W) in [-1, 1]: the decoded scenes drawn by the data
        engine's renderer (a diagnostic of the plan, never a generated image)."""
        return images_to_tensor(np.stack([np.asarray(preview(row, self.vocab)) for row in ids.tolist()])).to(ids.device)

    def assemble(self, pick: dict[str, torch.Tensor]) -> torch.Tensor:
        """Factor indices per position -> ids (the inverse of the codec's factor table, vectorised)."""
        v = self.vocab
        kinds = torch.tensor([int(k) for k in CELL_KINDS], device=pick["kind"].device)[pick["kind"]]
        shape_id = v.shape_base + ravel([pick[n] for n in ("shape", "color", "size", "dx", "dy")], v.shape_dims)
        text_id = v.text_base + ravel([pick[n] for n in ("ink", "cap", "dx", "dy")], v.text_dims)
        cells = torch.where(kinds == TokenKind.SHAPE, shape_id, torch.where(kinds == TokenKind.TEXT, text_id, v.empty_id))
        letter = pick["letter"]
        letters = torch.where(letter < v.pad_id - v.letter_base, v.letter_base + letter, v.pad_id)
        return torch.cat([pick["background"], cells, letters], dim=1)

