"""The AR model's embedding and output layer for the semantic blueprint's tokens, factorised so that they are learned
from every object.

The blueprint has 49,311 ids (`semantic_blueprint.py`), 46,080 of them shape anchors: a shape, color and size at one
of 64 sub-cell offsets. A flat table learned row by row would see most rows a handful of times in a CPU run. Here
every id is a few factors, and its embedding row is the sum of theirs:

    row(id) = kind[kind(id)] + head[head(id)] + anchor(id) * (dx[dx(id)] + dy[dy(id)])

`kind` is the token's kind (background, EMPTY, shape anchor, text anchor, letter, PAD); `head` is the id with its
offset removed (801 heads: 3 backgrounds, EMPTY, 720 shape anchors (shape, color, size), 50 text anchors (ink, cap
height), 26 letters, PAD), and a head's row is its own plus its factors' (a shape anchor's (shape, color) row and
size row, a text anchor's ink and cap rows), so that every red circle teaches the rows of all red circles' sizes;
anchors add the rows of their dx and dy offset bins, which shapes and words share.

The output layer uses the same rows (tied) as a hierarchy of small softmaxes over the ids a position allows:

    p(id) = p(kind) * p(head | kind) * p(dx) ** anchor * p(dy) ** anchor

So an object is one sampled id, its shape, color and size one joint choice given that there is an object, and its
offset two small ones. Why a hierarchy and not one softmax over the tied rows (which factorises the same way): with
one softmax, the ~60 empty cells of every blueprint pushed all anchors down together against the pull of its few
objects, and the tiny AR model never learned which object to write (p(right head | an object here) stayed at chance,
0.002 against 1/720, after 790 steps; docs/semantic_blueprint.md). Here empty cells train only the kind.

`log_probs` gives the exact log-likelihood of given ids (training, RL) from 6 + 801 + 8 + 8 logits; `full_log_probs`
gives every id's (for top-k and top-p, which rank all ids); the sampler otherwise draws level by level from
`constrained_log_probs`, the same hierarchy with its constraint (`offset_allowed`) applied. The AR model's own
table holds the text rows (text, `<im_start>`, `<im_end>`, the scale tokens); this part, saved in its own folder
(`image_embedding/`), holds the image side.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from transformers import Qwen3ForCausalLM

from .semantic_blueprint import BlueprintConfig, SemanticVocab, TokenKind
from ..shapeworld.render import make_text
from ..shapeworld.prompts import LETTERS
from ..shapeworld.world import MARGIN, scale
from .text_tokenizer import ImageVocab

MIN_SPACE = 1.0  # px a sampled shape keeps from the canvas edge and from every other shape (see `allowed`)


HEAD_FACTORS = ("shape_color", "size", "ink", "cap")  # what a head's row is built from, besides its own row


def factor_index(vocab: SemanticVocab) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Per id: its head class, its dx and dy bins (0 where it has none) and whether it is an anchor; and per head,
    its index in each of HEAD_FACTORS' tables (the table's last row where the factor does not apply)."""
    table = vocab.factor_table()
    anchor = np.isin(table["kind"], (TokenKind.SHAPE, TokenKind.TEXT))
    dx, dy = np.where(anchor, table["dx"], 0), np.where(anchor, table["dy"], 0)
    # An anchor's ids differ only in the last two raveled factors (dx, dy), so the id at offset (0, 0) names its head.
    at_origin = np.arange(vocab.size) - (dx * vocab.config.offset_bins + dy)
    first_ids, head = np.unique(at_origin, return_inverse=True)
    cards = vocab.factor_cardinalities()
    values = {
        "shape_color": np.where(table["shape"] >= 0, table["shape"] * cards["color"] + table["color"], cards["shape"] * cards["color"]),
        "size": np.where(table["size"] >= 0, table["size"], cards["size"]),
        "ink": np.where(table["ink"] >= 0, table["ink"], cards["ink"]),
        "cap": np.where(table["cap"] >= 0, table["cap"], cards["cap"]),
    }
    return head, dx, dy, anchor, {name: v[first_ids] for name, v in values.items()}


def anchor_head_block(head: np.ndarray, offset: np.ndarray, anchor: np.ndarray, offsets: int) -> tuple[int, int]:
    """The heads [start, stop) that are anchors, checking the id layout `full_log_probs` relies on: ids run through
    the heads in order, each non-anchor head one id, each anchor head `offsets` ids in order of their offset
    (dx * offset_bins + dy), and the anchor heads are one contiguous block."""
    anchor_heads = np.unique(head[anchor])
    start, stop = int(anchor_heads[0]), int(anchor_heads[-1]) + 1
    widths = np.where((np.arange(head.max() + 1) >= start) & (np.arange(head.max() + 1) < stop), offsets, 1)
    layout = np.repeat(np.arange(head.max() + 1), widths)
    if len(anchor_heads) != stop - start or not np.array_equal(layout, head) or not np.array_equal(offset[anchor], np.tile(np.arange(offsets), stop - start)):
        raise ValueError("the semantic vocabulary's id layout is not the one SemanticEmbedding.full_log_probs broadcasts over")
    return start, stop


def word_centre_band(c: BlueprintConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per cap height (index from `cap_range[0]`): the lowest and highest decoded centre height a data-engine word of
    that cap height can have. The data engine keeps a word's ink `MARGIN` px inside the top and bottom edges, and a
    word's ink is at least as tall as its shortest letter's, so its centre lies within [m + h / 2, S - m - h / 2]
    for that shortest ink height h; decoding puts a centre at its bin's middle, which is monotone, so the band's
    ends quantise the same way. Outside it, a sampled word overhangs the edge or nearly touches it: the tiny
    renderer drew 5 of 36 such words legibly, against 59 of 92 elsewhere (docs/semantic_blueprint.md, "Best of N")."""
    bin_width = c.cell / c.offset_bins
    caps = np.arange(c.cap_range[0], c.cap_range[1] + 1) * scale(c.canvas)
    shortest = np.array([min(make_text(letter, c.canvas / 2, c.canvas / 2, cap, "black").height for letter in LETTERS) for cap in caps])
    m = MARGIN * scale(c.canvas)
    quantised = lambda y: (np.floor(y / bin_width) + 0.5) * bin_width  # noqa: E731
    return quantised(m + shortest / 2), quantised(c.canvas - m - shortest / 2)


class SemanticEmbedding(ModelMixin, ConfigMixin):
    """Factor rows of the semantic image tokens (see the module docstring), with exact per-position log-probs.

    Args: hidden_size (the AR model's), init_std, and the blueprint's geometry (see `BlueprintConfig`)."""

    @register_to_config
    def __init__(self, hidden_size: int, init_std: float = 0.02, image_size: int = 64, grid: int = 8, offset_bins: int = 8, letter_slots: int = 4):
        super().__init__()
        self.vocab = vocab = SemanticVocab(BlueprintConfig(canvas=image_size, grid=grid, offset_bins=offset_bins, letter_slots=letter_slots))
        c = vocab.config
        head, dx, dy, anchor, head_factors = factor_index(vocab)
        kind = vocab.factor_table()["kind"]
        self.kind = nn.Embedding(len(TokenKind), hidden_size)
        self.head = nn.Embedding(int(head.max()) + 1, hidden_size)
        self.head_factors = nn.ModuleDict({name: nn.Embedding(int(v.max()) + 1, hidden_size) for name, v in head_factors.items()})
        self.dx = nn.Embedding(vocab.config.offset_bins, hidden_size)
        self.dy = nn.Embedding(vocab.config.offset_bins, hidden_size)
        for table in (self.kind, self.head, *self.head_factors.values(), self.dx, self.dy):
            nn.init.normal_(table.weight, std=init_std)
        for name, v in head_factors.items():
            self.register_buffer(f"head_{name}", torch.from_numpy(v), persistent=False)
        for name, values in (("kind_of", kind), ("head_of", head), ("dx_of", dx), ("dy_of", dy), ("anchor", anchor)):
            self.register_buffer(name, torch.from_numpy(np.array(values)), persistent=False)
        head_kind = torch.zeros(self.head.num_embeddings, dtype=torch.long)
        head_kind[self.head_of] = self.kind_of
        self.register_buffer("head_kind", head_kind, persistent=False)
        # Heads come in order of their kind (the ids do), so each kind's heads are one slice.
        if not np.all(np.diff(head_kind.numpy()) >= 0):
            raise ValueError("the semantic vocabulary's heads are not in order of their kind")
        bounds = np.searchsorted(head_kind.numpy(), np.arange(len(TokenKind) + 1))
        self.kind_heads = [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]
        self.anchor_heads = anchor_head_block(head, dx * c.offset_bins + dy, anchor, c.offset_bins**2)
        mask = torch.from_numpy(np.array(vocab.position_mask()))
        self.register_buffer("position_mask", mask, persistent=False)  # (positions, ids): which ids may stand where
        kind_allowed = torch.zeros(mask.shape[0], len(TokenKind), dtype=torch.bool)
        kind_allowed[:, self.kind_of] |= mask
        self.register_buffer("kind_allowed", kind_allowed, persistent=False)  # (positions, kinds)
        # Shape anchors' geometry, for the sampler's constraint: an id's box depends only on its (size, dx, dy), one
        # of 960 geometries; the constraint is computed per geometry and read out per id (class G: not a shape).
        table = vocab.factor_table()
        is_shape = table["kind"] == TokenKind.SHAPE  # the sizes, dx and dy of other ids are -1: clipped, then unused
        geometry = np.ravel_multi_index((table["size"], table["dx"], table["dy"]), (c.n_sizes, c.offset_bins, c.offset_bins), mode="clip")
        n_geometries = c.n_sizes * c.offset_bins**2
        size, dx, dy = np.unravel_index(np.arange(n_geometries), (c.n_sizes, c.offset_bins, c.offset_bins))
        bin_width = c.cell / c.offset_bins
        self.register_buffer("geometry_of", torch.from_numpy(np.where(is_shape, geometry, n_geometries)), persistent=False)
        self.register_buffer("geometry_offset", torch.tensor(np.stack([dx + 0.5, dy + 0.5], -1) * bin_width, dtype=torch.float32), persistent=False)
        self.register_buffer("geometry_half", torch.tensor((size + c.size_range[0]) * scale(c.canvas) / 2, dtype=torch.float32), persistent=False)
        origins = torch.tensor(np.stack([np.arange(c.n_cells) % c.grid, np.arange(c.n_cells) // c.grid], -1) * c.cell, dtype=torch.float32)
        centres = origins[:, None] + self.geometry_offset  # (cells, G, 2)
        half = self.geometry_half[:, None]
        self.register_buffer("geometry_centre", centres, persistent=False)
        fits_canvas = ((centres - half >= MIN_SPACE) & (centres + half <= c.canvas - MIN_SPACE)).all(-1)
        self.register_buffer("fits_canvas", fits_canvas, persistent=False)  # (cells, G)
        # Text anchors, for the same constraint: per grid row, cap height and offset, whether a word's centre lies in
        # the band of `word_centre_band`.
        low, high = word_centre_band(c)
        dy_of_slot = np.arange(c.offset_bins**2) % c.offset_bins
        word_y = np.arange(c.grid)[:, None, None] * c.cell + (dy_of_slot + 0.5) * bin_width  # (rows, 1, offsets)
        self.register_buffer("word_fits", torch.from_numpy((word_y >= low[:, None]) & (word_y <= high[:, None])), persistent=False)
        # The constraint is a mask over an offset class's offsets (`offset_allowed`): a shape head's class is its size,
        # a text head's its cap height, and every other head has one class of a single offset (slot 0).
        self.register_buffer("head_first_id", torch.from_numpy(np.searchsorted(head, np.arange(head.max() + 1))), persistent=False)  # ids in head order
        self.n_offset_classes = c.n_sizes + c.n_caps + 1
        head_class = np.where(self.head_kind.numpy() == TokenKind.SHAPE, head_factors["size"],
                              np.where(self.head_kind.numpy() == TokenKind.TEXT, c.n_sizes + head_factors["cap"], self.n_offset_classes - 1))
        self.register_buffer("head_class", torch.from_numpy(head_class), persistent=False)
        slot = self.dx_of * c.offset_bins + self.dy_of  # 0 for the ids that are not anchors
        self.register_buffer("id_slot", self.head_class[self.head_of] * c.offset_bins**2 + slot, persistent=False)

    def forward(self, ids: torch.Tensor, head_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of `ids` (blueprint ids, any shape) -> (..., hidden). `head_rows`: `head_rows()` computed once, for
        callers that read the rows at every step of a blueprint with the weights fixed (the sampler)."""
        head_rows = self.head_rows() if head_rows is None else head_rows
        rows = self.kind(self.kind_of[ids]) + head_rows[self.head_of[ids]]
        offset = self.dx(self.dx_of[ids]) + self.dy(self.dy_of[ids])
        return rows + offset * self.anchor[ids, None].to(rows.dtype)

    def allowed(self, written: torch.Tensor) -> torch.Tensor:
        """(B, ids) bool: the ids that may come next after the blueprint tokens `written` (B, s), s < N: those of the
        position's kinds (background, cell tokens, letters) at an offset `offset_allowed` leaves."""
        return self.position_mask[written.shape[1]] & self.offset_allowed(written).flatten(1)[:, self.id_slot]

    def offset_allowed(self, written: torch.Tensor) -> torch.Tensor:
        """(B, offset classes, offsets) bool: the sampler's constraint after the blueprint tokens `written` (B, s),
        per offset class (`head_class`: a shape's size, a word's cap height, one class of one offset for the rest).

        A shape anchor must keep its box inside the canvas and away from every shape already written, each by
        `MIN_SPACE` px (the data engine keeps 2 px; decoding moves a centre by at most 0.5 px, so every true
        blueprint keeps at least 1), and a text anchor its word's centre where the data engine could have put it
        (`word_centre_band`). The constraint reads only the tokens written so far, never the prompt."""
        c = self.vocab.config
        step, batch, offsets = written.shape[1], written.shape[0], c.offset_bins**2
        single = torch.zeros(batch, 1, offsets, dtype=torch.bool, device=written.device)
        single[..., 0] = True
        if step not in c.cell_positions:
            return torch.cat([single.new_ones(batch, c.n_sizes + c.n_caps, offsets), single], 1)
        cell = step - c.cell_positions.start
        centre, ok = self.geometry_centre[cell], self.fits_canvas[cell].expand(batch, -1)  # (G, 2), (B, G)
        earlier = written[:, c.cell_positions.start :]  # the cells written so far, in raster order
        earlier_is_shape = self.geometry_of[earlier] < len(self.geometry_half)
        k = int(earlier_is_shape.sum(1).max()) if earlier.shape[1] else 0
        if k:
            cells = earlier_is_shape.float().argsort(dim=1, descending=True, stable=True)[:, :k]  # each row's shapes first
            geometry, valid = self.geometry_of[earlier.gather(1, cells)], earlier_is_shape.gather(1, cells)
            geometry = geometry.clamp(max=len(self.geometry_half) - 1)  # padding rows are masked by `valid`
            earlier_centre = self.geometry_centre[cells, geometry]  # (B, k, 2)
            reach = self.geometry_half + torch.where(valid, self.geometry_half[geometry], -torch.inf)[..., None] + MIN_SPACE  # (B, k, G)
            near = ((centre[:, 0] - earlier_centre[..., :1]).abs() < reach) & ((centre[:, 1] - earlier_centre[..., 1:]).abs() < reach)
            ok = ok & ~near.any(1)
        words = self.word_fits[cell // c.grid].expand(batch, -1, -1)
        return torch.cat([ok.view(batch, c.n_sizes, offsets), words, single], 1)

    def constrained_log_probs(self, hidden: torch.Tensor, written: torch.Tensor, head_rows: torch.Tensor | None = None) -> "HierarchyLogProbs":
        """The hierarchy's log-probs (`factor_log_probs`) for the token after `written` (B, s), with an offset's
        log-prob -inf where `offset_allowed` refuses it: what the sampler draws from, level by level."""
        kind, head, dx, dy = self.factor_log_probs(hidden, written.shape[1], head_rows)
        offset = torch.where(self.offset_allowed(written), (dx[:, :, None] + dy[:, None, :]).flatten(1)[:, None], -torch.inf)
        offset[:, -1, 0] = 0.0  # the heads without an offset: their one slot, probability 1
        return HierarchyLogProbs(kind, head, offset)

    def kind_logsumexp(self, per_head: torch.Tensor) -> torch.Tensor:
        """(..., kinds): logsumexp of `per_head` (..., heads) over each kind's heads."""
        return torch.stack([per_head[..., heads].logsumexp(-1) for heads in self.kind_heads], -1)

    def head_rows(self) -> torch.Tensor:
        """(801, hidden): each head's row, its own plus its factors' (a shape anchor's (shape, color) and size, a text
        anchor's ink and cap height), so that every object of a color and shape teaches all its sizes' rows."""
        return self.head.weight + sum(table.weight[getattr(self, f"head_{name}")] for name, table in self.head_factors.items())

    def factor_log_probs(
        self, hidden: torch.Tensor, positions: torch.Tensor | int, head_rows: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """log p(kind) over the kinds a blueprint position allows, log p(head | its kind), log p(dx), log p(dy):
        (..., 6), (..., 801), (..., 8), (..., 8) for `hidden` (..., H) predicting the token at `positions`
        (`head_rows` as in `forward`)."""
        hidden = hidden.float()
        kind = (hidden @ self.kind.weight.float().T).masked_fill(~self.kind_allowed[positions], -torch.inf).log_softmax(-1)
        head = hidden @ (self.head_rows() if head_rows is None else head_rows).float().T
        head = head - self.kind_logsumexp(head)[..., self.head_kind]
        return kind, head, (hidden @ self.dx.weight.float().T).log_softmax(-1), (hidden @ self.dy.weight.float().T).log_softmax(-1)

    def log_probs(self, hidden: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """log p(id) (the hierarchy in the module docstring) of `ids` (...) standing at blueprint `positions` (...),
        predicted from `hidden` (..., H)."""
        kind, head, dx, dy = self.factor_log_probs(hidden, positions)
        pick = lambda lp, index: lp.gather(-1, index[..., None]).squeeze(-1)  # noqa: E731
        offset = pick(dx, self.dx_of[ids]) + pick(dy, self.dy_of[ids])
        return pick(kind, self.kind_of[ids]) + pick(head, self.head_of[ids]) + torch.where(self.anchor[ids], offset, 0.0)

    def full_log_probs(self, hidden: torch.Tensor, position: int) -> torch.Tensor:
        """(B, ids) log p of every id at blueprint `position` (-inf where the position allows none of its kind).
        Built by broadcasting over the id layout (`anchor_head_block`), not by gathering per id: the sampler's
        flat draws (top-k, top-p) call it at every step for 49,311 ids."""
        kind, head, dx, dy = self.factor_log_probs(hidden, position)
        heads = kind[..., self.head_kind] + head
        start, stop = self.anchor_heads
        anchors = heads[..., start:stop, None] + (dx[..., :, None] + dy[..., None, :]).flatten(-2)[..., None, :]
        return torch.cat([heads[..., :start], anchors.flatten(-2), heads[..., stop:]], -1)


class HierarchyLogProbs(NamedTuple):
    """One blueprint position's distribution as its hierarchy (module docstring), constrained: log p(id) =
    kind[kind(id)] + head[head(id)] + offset[head_class(head(id)), slot(id)], -inf where an id is not allowed."""

    kind: torch.Tensor  # (B, kinds) log p(kind), -inf for the kinds the position does not take
    head: torch.Tensor  # (B, heads) log p(head | its kind)
    offset: torch.Tensor  # (B, offset classes, offsets) log p(dx) + log p(dy), -inf where refused (one class: 0 at slot 0)


def input_embeddings(ar: Qwen3ForCausalLM, embedding: SemanticEmbedding, input_ids: torch.Tensor, image_vocab: ImageVocab) -> torch.Tensor:
    """The AR model's input vectors for token ids: text rows from its own table, image rows from the factors."""
    is_image = (input_ids >= image_vocab.image_offset) & (input_ids < image_vocab.vocab_end)
    text = ar.get_input_embeddings()(input_ids.masked_fill(is_image, 0))
    image = embedding((input_ids - image_vocab.image_offset).clamp(0, image_vocab.codebook_size - 1))
    return torch.where(is_image[..., None], image.to(text.dtype), text)


def blueprint_positions(input_ids: torch.Tensor, image_vocab: ImageVocab) -> torch.Tensor:
    """Each token's position inside the blueprint it belongs to: its distance from the last <S0> before it, minus 1."""
    steps = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    last_scale = torch.where(input_ids == image_vocab.scales[0], steps, 0).cummax(1).values
    return steps - last_scale - 1


def token_log_probs(
    ar: Qwen3ForCausalLM, embedding: SemanticEmbedding, hidden: torch.Tensor, targets: torch.Tensor, input_ids: torch.Tensor, image_vocab: ImageVocab
) -> torch.Tensor:
    """log p of each next token `targets` (B, T - 1; -100 ignored, giving 0) from `hidden` (B, T - 1, H).

    Blueprint tokens get `SemanticEmbedding.log_probs` (over the ids their position allows); the others are
    normalised over the non-image tokens (text and the image-span markers), since a sampler never draws an image
    token outside a blueprint."""
    is_image = (targets >= image_vocab.image_offset) & (targets < image_vocab.vocab_end)
    out = hidden.new_zeros(targets.shape, dtype=torch.float32)
    if is_image.any():
        positions = blueprint_positions(input_ids, image_vocab)[:, 1:]
        out[is_image] = embedding.log_probs(hidden[is_image], targets[is_image] - image_vocab.image_offset, positions[is_image])
    text = ~is_image & (targets != -100)
    if text.any():
        rows = ar.get_output_embeddings().weight[: image_vocab.image_offset]
        logits = hidden[text].float() @ rows.float().T
        out[text] = logits.log_softmax(-1).gather(-1, targets[text][:, None]).squeeze(-1)
    return out
