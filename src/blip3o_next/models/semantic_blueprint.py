"""Semantic blueprint codec: an exact, hand-written map between a ShapeWorld `Scene` and a fixed-length
sequence of integer token ids whose meaning is the scene (one token per object), and back.

These are the `tiny` model's *semantic* image tokens: the autoregressive model writes the blueprint,
one anchor token per object, instead of learned pixel-patch VQ codes. The codec is the ground truth
for them (training targets come from the data engine's scenes); `preview` and `plan_score` read a
blueprint without any diffusion model.

Sequence layout (fixed length N = 1 + G*G + L; N = 69 for the default S = 64, G = 8, L = 4)
---------------------------------------------------------------------------------------------
- position 0: the background token (white / gray / black);
- positions 1 .. G*G: one token per grid cell (cells of S/G = 8 px), raster order (row-major, top row first):
  EMPTY, a SHAPE anchor (shape, color, size, dx, dy) or a TEXT anchor (ink, cap height, dx, dy);
- positions G*G + 1 .. N - 1: the letter slots: the text object's word, one letter A-Z per slot, then PAD.

Anchoring
---------
An object's anchor cell is the cell that contains its bounding-box centre (the centre, not a corner: the
contract's relations, regions and edit tolerances are all stated on centres, so quantising the centre bounds
exactly the error those checks see, and a size change keeps the anchor). Two objects (almost) never share
a cell: boxes keep a gap >= 2 px and a shape's side is >= 10 px, so along the axis that separates two boxes
their centres are at least 5 + 5 + 2 = 12 px apart between two shapes, or 5 + w/2 + 2 between a shape and a
word of ink width w (a word's ink height is >= 9.75 px, so a vertical separation is always >= 11.9 px). Two
points >= 8 px apart along an axis cannot lie in one half-open 8 px cell. The one exception in the contract's
world is a word whose ink is narrower than 2 px (the single letter "I" at cap heights 10, 11, 12 and 14, ink
1.5-1.75 px wide) beside a size-10 shape at a gap of less than 2.25 px: their centres may be 7.75-7.875 px apart
in one cell (measured: 1 of 20,000 `sample_scene` scenes with text probability 0.5). `encode_scene` raises ValueError
for such a scene (and for any other collision) rather than drop an object; callers building training data skip
it. `tests/test_semantic_blueprint.py` checks the separation bounds over sampled scenes and this exception.

Quantisation, and why it keeps every check of the contract
------------------------------------------------------------
Within its cell a centre is quantised per axis into 8 bins of 1 px, and decoding puts it at the bin's middle.
Cells are whole multiples of the bin, so the decoded coordinate is Q(x) = floor(x) + 0.5 over the whole
canvas: monotone, error in (-0.5, +0.5] per axis. A shape's centre therefore moves at most 0.5 px per axis
(0.71 px); a word's at most 0.625 px, because decoding rebuilds it with the data engine's own `make_text`,
which snaps the ink box to the quarter-pixel grid (1/8 px more).
- Relations (margin m = 8 px): Q(b) - Q(a) = floor(b) - floor(a) >= floor(b - a). A relation between shapes
  that holds still holds after decoding, and the 1 px slack the sampler keeps (SAMPLING_SLACK: b - a >= 9)
  is kept whole (>= 9 px); with a word (1/8 px snap) >= 8.875 px remain.
- Regions (x < 25.6, > 38.4, centre [22.4, 41.6] ...): on the samplers' quarter-pixel grid `left side` means
  x <= 25.5, so Q(x) <= 25.5 < 25.6, and so on: shapes keep their regions even without slack; words of
  sampled scenes (1 px slack) keep >= 0.975 px to spare.
- Sizes and cap heights are whole px at S = 64 (10..24 and 10..14, rounded half up and clamped when
  encoding); the data engine draws them as integers, so they round-trip exactly. The edit tolerance (3 px,
  25 % of the size) is far above these errors.
- Gaps: two boxes >= 2 px apart may decode 1.5 px apart (both centres move); decoded scenes are plans,
  and the verifier still separates such boxes in the rendered preview.
All of this is checked exhaustively over the grids, and over sampled scenes, in the tests.

Why 1 px bins and not the design's 4 bins of 2 px (12,351 ids instead of 49,311): with 2 px bins,
Q(x) = 2 floor(x / 2) + 1 still keeps every shape relation and region, but it eats the sampler's slack:
two shapes 9 px apart can decode exactly 8 px apart, on the margin, and the verifier reading the rendered
preview then misses the relation (measured: 1.0 % of 1,000 sampled `position` prompts and 2.5 % of 1,000
`dense` prompts with relations fail, against 0 for the scenes' own renders and 0 with 1 px bins). For a
relation with a word it breaks the decoded scene itself (6 of 600 sampled `the word "AB" above a red circle`
-like prompts): make_text's 1/8 px snap turns 8 px into 7.875 px, and no decoding rule avoids that, since the
centre of a word whose ink is an odd number of quarter pixels wide can only land on the odd-eighth grid.
`BlueprintConfig.offset_bins` keeps 4 bins available where a smaller vocabulary matters more.

Token ids (`SemanticVocab`), in this order: 3 backgrounds, EMPTY, 6 x 8 x 15 x 8 x 8 = 46,080 shape anchors,
10 x 5 x 8 x 8 = 3,200 text anchors (inks: the 8 object colors, then black and white), 26 letters, PAD:
49,311 ids. `SemanticVocab.factor_table` gives, per id, the index of each factor (-1 where it does not apply)
for a factorised (sum of factor embeddings) input layer; shapes and words share the dx / dy factors (the
same 1 px bins).

Decoding is total: any sequence of N in-range ids gives a Scene (see `decode_tokens` for the rules), so
an autoregressive model's malformed blueprints can still be previewed and scored.

Lengths live in `BlueprintConfig`; only S = 64 is used and tested. Sizes and cap heights are counted in px
at S = 64 and scale with the canvas, like every length of the contract.

Over 400 lines on purpose: one format, documented once above; the encoder, the total decoder, the preview, the plan
score and the changed region all read or write it, and apart they would each need this description.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from functools import lru_cache
from types import MappingProxyType
from typing import NamedTuple

import numpy as np
from PIL import Image

from ..eval.scorers import T2IResult, check_t2i
from ..shapeworld.prompts import LETTERS, Requirement
from ..shapeworld.render import glyph_boxes, make_text, render_pil, text_alpha
from ..shapeworld.world import (
    BACKGROUNDS,
    CAP_HEIGHT_RANGE,
    COLORS,
    DEFAULT_BACKGROUND,
    MAX_WORD_LEN,
    SHAPES,
    SIZE_RANGES,
    TEXT_INK,
    Scene,
    ShapeObject,
    TextObject,
    check_canvas,
    scale,
)

BACKGROUND_NAMES = tuple(BACKGROUNDS)
COLOR_NAMES = tuple(COLORS)
INK_NAMES = COLOR_NAMES + tuple(TEXT_INK)  # same order as the verifier's inks

TokenIds = Sequence[int] | np.ndarray  # torch tensors work too (anything with .tolist())


@dataclass(frozen=True)
class BlueprintConfig:
    """The blueprint's geometry. Defaults: S = 64, an 8 x 8 grid of 8 px cells, 4 letter slots (N = 69).

    `offset_bins`: sub-cell offset bins per axis of an anchor (8 = 1 px at S = 64; see the module docstring for
    why not 4). `size_range` / `cap_range`: inclusive integer sides and cap heights in px at S = 64 (the
    contract's 10-24 and 10-14)."""

    canvas: int = 64
    grid: int = 8
    offset_bins: int = 8
    letter_slots: int = MAX_WORD_LEN
    size_range: tuple[int, int] = (SIZE_RANGES["small"][0], SIZE_RANGES["large"][1])
    cap_range: tuple[int, int] = CAP_HEIGHT_RANGE

    def __post_init__(self) -> None:
        check_canvas(self.canvas)
        if self.grid < 1 or self.canvas % self.grid:
            raise ValueError(f"grid {self.grid} must divide the canvas {self.canvas}")
        if self.offset_bins < 1 or self.letter_slots < 1:
            raise ValueError(f"bins and letter slots must be positive, got {self}")
        if not (1 <= self.size_range[0] <= self.size_range[1] and 1 <= self.cap_range[0] <= self.cap_range[1]):
            raise ValueError(f"bad size or cap range in {self}")

    @property
    def cell(self) -> int:
        """Cell side in canvas px."""
        return self.canvas // self.grid

    @property
    def n_cells(self) -> int:
        return self.grid * self.grid

    @property
    def seq_len(self) -> int:
        return 1 + self.n_cells + self.letter_slots

    @property
    def cell_positions(self) -> range:
        return range(1, 1 + self.n_cells)

    @property
    def letter_positions(self) -> range:
        return range(1 + self.n_cells, self.seq_len)

    @property
    def n_sizes(self) -> int:
        return self.size_range[1] - self.size_range[0] + 1

    @property
    def n_caps(self) -> int:
        return self.cap_range[1] - self.cap_range[0] + 1


class TokenKind(IntEnum):
    BACKGROUND = 0
    EMPTY = 1
    SHAPE = 2
    TEXT = 3
    LETTER = 4
    PAD = 5


class TokenFactors(NamedTuple):
    """The factors of one id, as indices (-1 where a factor does not apply to the kind):
    background into BACKGROUND_NAMES, shape into SHAPES, color into COLOR_NAMES, ink into INK_NAMES,
    letter into A-Z; size = side - size_range[0] and cap = cap height - cap_range[0] (px at S = 64);
    dx, dy = the centre's offset bin within its cell (shapes and text), 0 = left / top."""

    kind: TokenKind
    background: int = -1
    shape: int = -1
    color: int = -1
    size: int = -1
    dx: int = -1
    dy: int = -1
    ink: int = -1
    cap: int = -1
    letter: int = -1


FACTOR_NAMES: tuple[str, ...] = TokenFactors._fields


def ravel(index: Sequence, dims: Sequence[int]):
    """Row-major flat index of `index` in a grid of `dims`; works on ints and, elementwise, on tensors or arrays."""
    flat = 0
    for i, d in zip(index, dims):
        flat = flat * d + i
    return flat


def _unravel(flat: int, dims: Sequence[int]) -> list[int]:
    out = []
    for d in reversed(dims):
        flat, r = divmod(flat, d)
        out.append(r)
    return out[::-1]


def _index_of(name: str, names: Sequence[str], what: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(names)}") from None


def _check_range(value: int, lo: int, hi: int, what: str) -> int:
    if not lo <= value <= hi:
        raise ValueError(f"{what} {value} outside [{lo}, {hi}]")
    return value


@dataclass(frozen=True)
class SemanticVocab:
    """The ids of the semantic blueprint tokens (layout in the module docstring). Immutable; its derived
    tables are cached per vocab by value."""

    config: BlueprintConfig = BlueprintConfig()

    # ------------------------------------------------------------------ layout

    @property
    def shape_dims(self) -> tuple[int, ...]:
        c = self.config
        return (len(SHAPES), len(COLOR_NAMES), c.n_sizes, c.offset_bins, c.offset_bins)

    @property
    def text_dims(self) -> tuple[int, ...]:
        c = self.config
        return (len(INK_NAMES), c.n_caps, c.offset_bins, c.offset_bins)

    @property
    def empty_id(self) -> int:
        return len(BACKGROUND_NAMES)

    @property
    def shape_base(self) -> int:
        return self.empty_id + 1

    @property
    def text_base(self) -> int:
        return self.shape_base + math.prod(self.shape_dims)

    @property
    def letter_base(self) -> int:
        return self.text_base + math.prod(self.text_dims)

    @property
    def pad_id(self) -> int:
        return self.letter_base + len(LETTERS)

    @property
    def size(self) -> int:
        """Number of ids."""
        return self.pad_id + 1

    # ------------------------------------------------------------------ named constructors

    def background_token(self, background: str) -> int:
        return _index_of(background, BACKGROUND_NAMES, "background")

    def shape_token(self, shape: str, color: str, size: int, dx: int, dy: int) -> int:
        """A shape anchor: `size` = box side in px at S = 64; dx, dy = offset bins in [0, offset_bins)."""
        c = self.config
        return self.token(
            TokenFactors(
                TokenKind.SHAPE,
                shape=_index_of(shape, SHAPES, "shape"),
                color=_index_of(color, COLOR_NAMES, "color"),
                size=_check_range(size, *c.size_range, "size") - c.size_range[0],
                dx=dx,
                dy=dy,
            )
        )

    def text_token(self, ink: str, cap_height: int, dx: int, dy: int) -> int:
        """A text anchor: `cap_height` in px at S = 64; dx, dy = offset bins in [0, offset_bins)."""
        c = self.config
        return self.token(
            TokenFactors(
                TokenKind.TEXT,
                ink=_index_of(ink, INK_NAMES, "ink"),
                cap=_check_range(cap_height, *c.cap_range, "cap height") - c.cap_range[0],
                dx=dx,
                dy=dy,
            )
        )

    def letter_token(self, letter: str) -> int:
        return self.letter_base + _index_of(letter, LETTERS, "letter")

    # ------------------------------------------------------------------ id <-> factors

    def kind(self, token: int) -> TokenKind:
        return self.factors(token).kind

    def factors(self, token: int) -> TokenFactors:
        """The factors of an id (ValueError if it is out of range)."""
        if not 0 <= token < self.size:
            raise ValueError(f"token id {token} out of range [0, {self.size})")
        if token < self.empty_id:
            return TokenFactors(TokenKind.BACKGROUND, background=token)
        if token == self.empty_id:
            return TokenFactors(TokenKind.EMPTY)
        if token < self.text_base:
            shape, color, size, dx, dy = _unravel(token - self.shape_base, self.shape_dims)
            return TokenFactors(TokenKind.SHAPE, shape=shape, color=color, size=size, dx=dx, dy=dy)
        if token < self.letter_base:
            ink, cap, dx, dy = _unravel(token - self.text_base, self.text_dims)
            return TokenFactors(TokenKind.TEXT, ink=ink, cap=cap, dx=dx, dy=dy)
        if token < self.pad_id:
            return TokenFactors(TokenKind.LETTER, letter=token - self.letter_base)
        return TokenFactors(TokenKind.PAD)

    def token(self, f: TokenFactors) -> int:
        """The id with these factors (inverse of `factors`); ValueError for an index out of its range or a
        factor set that does not apply to the kind."""
        kind = TokenKind(f.kind)
        used = {
            TokenKind.BACKGROUND: ("background",),
            TokenKind.EMPTY: (),
            TokenKind.SHAPE: ("shape", "color", "size", "dx", "dy"),
            TokenKind.TEXT: ("ink", "cap", "dx", "dy"),
            TokenKind.LETTER: ("letter",),
            TokenKind.PAD: (),
        }[kind]
        stray = [n for n in FACTOR_NAMES[1:] if n not in used and getattr(f, n) != -1]
        if stray:
            raise ValueError(f"factors {stray} do not apply to a {kind.name} token")
        cards = self.factor_cardinalities()
        for n in used:
            _check_range(getattr(f, n), 0, cards[n] - 1, f"{n} index")
        if kind is TokenKind.BACKGROUND:
            return f.background
        if kind is TokenKind.EMPTY:
            return self.empty_id
        if kind is TokenKind.SHAPE:
            return self.shape_base + ravel([f.shape, f.color, f.size, f.dx, f.dy], self.shape_dims)
        if kind is TokenKind.TEXT:
            return self.text_base + ravel([f.ink, f.cap, f.dx, f.dy], self.text_dims)
        if kind is TokenKind.LETTER:
            return self.letter_base + f.letter
        return self.pad_id

    def describe(self, token: int) -> str:
        """A human-readable name of an id, e.g. 'shape red star s=12 dx=1 dy=3'."""
        f = self.factors(token)
        c = self.config
        if f.kind is TokenKind.BACKGROUND:
            return f"background {BACKGROUND_NAMES[f.background]}"
        if f.kind is TokenKind.SHAPE:
            return f"shape {COLOR_NAMES[f.color]} {SHAPES[f.shape]} s={f.size + c.size_range[0]} dx={f.dx} dy={f.dy}"
        if f.kind is TokenKind.TEXT:
            return f"text {INK_NAMES[f.ink]} cap={f.cap + c.cap_range[0]} dx={f.dx} dy={f.dy}"
        if f.kind is TokenKind.LETTER:
            return f"letter {LETTERS[f.letter]}"
        return f.kind.name.lower()

    # ------------------------------------------------------------------ tables for the AR model

    def factor_cardinalities(self) -> dict[str, int]:
        """How many values each factor takes (the row count of its embedding table); kind included."""
        c = self.config
        return {
            "kind": len(TokenKind),
            "background": len(BACKGROUND_NAMES),
            "shape": len(SHAPES),
            "color": len(COLOR_NAMES),
            "size": c.n_sizes,
            "dx": c.offset_bins,
            "dy": c.offset_bins,
            "ink": len(INK_NAMES),
            "cap": c.n_caps,
            "letter": len(LETTERS),
        }

    def factor_table(self) -> Mapping[str, np.ndarray]:
        """For every factor name, an int64 array of shape (size,): the factor's index for each id, -1 where it
        does not apply. Read-only and shared (cached); `torch.tensor(arr)` copies one for a model."""
        return _factor_table(self)

    def position_mask(self) -> np.ndarray:
        """Bool (seq_len, size): which ids may stand at each position (backgrounds at 0, EMPTY/shape/text anchors
        at the cells, letters and PAD at the letter slots). Read-only and shared (cached)."""
        return _position_mask(self)


@lru_cache(maxsize=8)
def _factor_table(vocab: SemanticVocab) -> Mapping[str, np.ndarray]:
    """Vectorised: one block of ids per kind, unravelled with numpy (the same row-major order as `token`)."""
    n = vocab.size
    table = {name: np.full(n, -1, np.int64) for name in FACTOR_NAMES}
    kind = table["kind"]
    bg = np.arange(vocab.empty_id)
    kind[bg] = TokenKind.BACKGROUND
    table["background"][bg] = bg
    kind[vocab.empty_id] = TokenKind.EMPTY
    shapes = np.arange(vocab.shape_base, vocab.text_base)
    kind[shapes] = TokenKind.SHAPE
    shape_factors = np.unravel_index(shapes - vocab.shape_base, vocab.shape_dims)
    for name, values in zip(("shape", "color", "size", "dx", "dy"), shape_factors):
        table[name][shapes] = values
    texts = np.arange(vocab.text_base, vocab.letter_base)
    kind[texts] = TokenKind.TEXT
    text_factors = np.unravel_index(texts - vocab.text_base, vocab.text_dims)
    for name, values in zip(("ink", "cap", "dx", "dy"), text_factors):
        table[name][texts] = values
    letters = np.arange(vocab.letter_base, vocab.pad_id)
    kind[letters] = TokenKind.LETTER
    table["letter"][letters] = letters - vocab.letter_base
    kind[vocab.pad_id] = TokenKind.PAD
    for arr in table.values():
        arr.setflags(write=False)
    return MappingProxyType(table)


@lru_cache(maxsize=8)
def _position_mask(vocab: SemanticVocab) -> np.ndarray:
    c = vocab.config
    kind = _factor_table(vocab)["kind"]
    mask = np.zeros((c.seq_len, vocab.size), bool)
    mask[0] = kind == TokenKind.BACKGROUND
    mask[c.cell_positions.start : c.cell_positions.stop] = np.isin(kind, (TokenKind.EMPTY, TokenKind.SHAPE, TokenKind.TEXT))
    mask[c.letter_positions.start : c.letter_positions.stop] = np.isin(kind, (TokenKind.LETTER, TokenKind.PAD))
    mask.setflags(write=False)
    return mask


DEFAULT_CONFIG = BlueprintConfig()
DEFAULT_VOCAB = SemanticVocab(DEFAULT_CONFIG)


# ----------------------------------------------------------------------------- geometry


def _round_half_up(x: float) -> int:
    """Nearest integer, halves up (Python's round() would send 12.5 to 12 but 13.5 to 14)."""
    return math.floor(x + 0.5)


def anchor_of(cx: float, cy: float, config: BlueprintConfig) -> tuple[int, int, int]:
    """(cell index in raster order, dx bin, dy bin) of a centre; ValueError if it is off the canvas."""
    if not (0 <= cx < config.canvas and 0 <= cy < config.canvas):
        raise ValueError(f"centre ({cx}, {cy}) lies outside the {config.canvas}px canvas")
    cell, bins = config.cell, config.offset_bins
    width = cell / bins
    col, row = int(cx // cell), int(cy // cell)
    dx = min(int((cx - col * cell) // width), bins - 1)  # min: guards float round-off at a cell's far edge
    dy = min(int((cy - row * cell) // width), bins - 1)
    return row * config.grid + col, dx, dy


def anchor_centre(cell: int, dx: int, dy: int, config: BlueprintConfig) -> tuple[float, float]:
    """The decoded centre: the middle of the offset bin."""
    row, col = divmod(cell, config.grid)
    width = config.cell / config.offset_bins
    return col * config.cell + (dx + 0.5) * width, row * config.cell + (dy + 0.5) * width


def _reference_int(value: float, canvas: int, lo_hi: tuple[int, int]) -> int:
    """A length in px at S = 64, rounded half up and clamped to the inclusive range."""
    return min(max(_round_half_up(value / scale(canvas)), lo_hi[0]), lo_hi[1])


# ----------------------------------------------------------------------------- encode / decode


def encode_scene(scene: Scene, vocab: SemanticVocab = DEFAULT_VOCAB) -> list[int]:
    """The blueprint ids of a scene (exact up to the documented quantisation).

    Raises ValueError when the scene cannot be written: another canvas size, an unknown name, a centre off the
    canvas, two anchors in one cell, a word that is not 1..letter_slots letters A-Z."""
    c = vocab.config
    if scene.canvas != c.canvas:
        raise ValueError(f"the blueprint is for a {c.canvas}px canvas, the scene's is {scene.canvas}px")
    ids = [vocab.background_token(scene.background)] + [vocab.empty_id] * c.n_cells + [vocab.pad_id] * c.letter_slots
    owners: dict[int, str] = {}

    def put(cell: int, token: int, what: str) -> None:
        if cell in owners:
            row, col = divmod(cell, c.grid)
            raise ValueError(f"{what} and {owners[cell]} both anchor in cell (row {row}, col {col}); a cell holds one object")
        owners[cell] = what
        ids[c.cell_positions[cell]] = token

    for i, o in enumerate(scene.objects):
        what = f"object {i} ({o.color} {o.shape} at ({o.cx}, {o.cy}))"
        cell, dx, dy = anchor_of(o.cx, o.cy, c)
        size = _reference_int(o.size, c.canvas, c.size_range)
        put(cell, vocab.shape_token(o.shape, o.color, size, dx, dy), what)
    if scene.text is not None:
        t = scene.text
        if not re.fullmatch(f"[A-Z]{{1,{c.letter_slots}}}", t.word):
            raise ValueError(f"word {t.word!r} is not 1 to {c.letter_slots} letters A-Z")
        cell, dx, dy = anchor_of(t.cx, t.cy, c)
        cap = _reference_int(t.cap_height, c.canvas, c.cap_range)
        put(cell, vocab.text_token(t.color, cap, dx, dy), f'the word "{t.word}" at ({t.cx}, {t.cy})')
        for pos, letter in zip(c.letter_positions, t.word):
            ids[pos] = vocab.letter_token(letter)
    return ids


def _id_list(ids: TokenIds, vocab: SemanticVocab) -> list[int]:
    """The ids as Python ints; ValueError for a wrong shape or length, non-integers, or ids out of range."""
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    try:
        values = [operator.index(v) for v in values]
    except TypeError:
        raise ValueError("blueprint ids must be a 1-D sequence of integers") from None
    n = vocab.config.seq_len
    if len(values) != n:
        raise ValueError(f"a blueprint has length {n}, got length {len(values)}")
    bad = [(p, v) for p, v in enumerate(values) if not 0 <= v < vocab.size]
    if bad:
        p, v = bad[0]
        raise ValueError(f"token id {v} at position {p} out of range [0, {vocab.size}) ({len(bad)} such ids)")
    return values


def decode_tokens(ids: TokenIds, vocab: SemanticVocab = DEFAULT_VOCAB) -> Scene:
    """The scene a blueprint describes. Total, so that any model output can be previewed and scored:

    - a token of the wrong kind for its position is ignored: at 0 the background is then white (the contract's
      default), at a cell it counts as EMPTY, at a letter slot as PAD;
    - every shape anchor gives a shape, even where shapes would overlap or leave the canvas (scoring judges that);
    - the first text anchor in raster order gives the text object; later ones are ignored;
    - the word is the letters before the first PAD (or other non-letter) in the slots; letters after it are
      ignored; a text anchor with an empty word gives no text, and letters without a text anchor are ignored;
    - the word's ink box is measured from the font by the data engine's `make_text`, centred at the bin middle.

    Raises ValueError only for a wrong length or ids out of range (or non-integers)."""
    values = _id_list(ids, vocab)
    c = vocab.config
    k = scale(c.canvas)
    head = vocab.factors(values[0])
    background = BACKGROUND_NAMES[head.background] if head.kind is TokenKind.BACKGROUND else DEFAULT_BACKGROUND
    objects: list[ShapeObject] = []
    text_anchor: tuple[int, TokenFactors] | None = None
    for cell, pos in enumerate(c.cell_positions):
        f = vocab.factors(values[pos])
        if f.kind is TokenKind.SHAPE:
            cx, cy = anchor_centre(cell, f.dx, f.dy, c)
            size = (f.size + c.size_range[0]) * k
            objects.append(ShapeObject(SHAPES[f.shape], COLOR_NAMES[f.color], cx, cy, size))
        elif f.kind is TokenKind.TEXT and text_anchor is None:
            text_anchor = (cell, f)
    word = ""
    for pos in c.letter_positions:
        f = vocab.factors(values[pos])
        if f.kind is not TokenKind.LETTER:
            break
        word += LETTERS[f.letter]
    text: TextObject | None = None
    if text_anchor is not None and word:
        cell, f = text_anchor
        cx, cy = anchor_centre(cell, f.dx, f.dy, c)
        text = make_text(word, cx, cy, (f.cap + c.cap_range[0]) * k, INK_NAMES[f.ink])
    return Scene(c.canvas, background, tuple(objects), text)


def preview(ids: TokenIds, vocab: SemanticVocab = DEFAULT_VOCAB) -> Image.Image:
    """The blueprint drawn by the data engine's renderer: a diagnostic shown to users, never the model's image."""
    return render_pil(decode_tokens(ids, vocab))


def plan_score(ids: TokenIds, requirement: Requirement, vocab: SemanticVocab = DEFAULT_VOCAB) -> T2IResult:
    """`check_t2i` of the decoded blueprint: whether the plan satisfies the prompt, with no diffusion in between
    (and no verifier: the decoded scene is exact, so a failure is the plan's own)."""
    return check_t2i(requirement, decode_tokens(ids, vocab))


def object_boxes(ids: TokenIds, vocab: SemanticVocab = DEFAULT_VOCAB) -> np.ndarray:
    """(K, 5) float32 rows (token position, cx, cy, half width, half height), px: for each token that draws
    something, the box it draws in the decoded scene. Shape anchors give their shape's box, the text anchor its
    word's ink box, and each letter slot its glyph's box (where `make_text` lays the letter out). Tells the
    renderer where each token's content goes."""
    scene = decode_tokens(ids, vocab)
    c = vocab.config
    rows = [(c.cell_positions[anchor_of(o.cx, o.cy, c)[0]], o.cx, o.cy, o.size / 2, o.size / 2) for o in scene.objects]
    if scene.text is not None:
        t = scene.text
        rows.append((c.cell_positions[anchor_of(t.cx, t.cy, c)[0]], t.cx, t.cy, t.width / 2, t.height / 2))
        rows += [(position, *box) for position, box in zip(c.letter_positions, glyph_boxes(t))]
    return np.asarray(rows, np.float32).reshape(-1, 5)


def glyph_ink(ids: TokenIds, vocab: SemanticVocab = DEFAULT_VOCAB) -> np.ndarray:
    """(canvas, canvas) float32 ink coverage in [0, 1] of the blueprint's word, its letters laid out as `make_text`
    lays them out (all zero without a word). The renderer's glyph condition: which pixels each letter's strokes
    cover, so the diffusion transformer need not learn 26 glyph shapes at every sub-cell offset from one state per
    letter. Colour, background and everything else still come from the AR model's hidden states."""
    scene = decode_tokens(ids, vocab)
    ink = np.zeros((scene.canvas, scene.canvas), np.float32)
    if scene.text is not None:
        x0, y0, alpha = text_alpha(scene.text, scene.canvas)
        ink[y0 : y0 + alpha.shape[0], x0 : x0 + alpha.shape[1]] = alpha
    return ink


KEEP_TOLERANCE = 2.0
"""px at S = 64: an object or word an edit's blueprint writes this close to where its reference has it, in the same
form, is the reference's, kept. The AR model copies positions to about one 1 px bin, and a word centred on the
canvas (as the data engine sets words) sits on a cell border, so a copy may land in the neighbouring cell; the
contract's own tolerance for untouched objects is 3 px, and no edit moves an object less than that."""


def _form(o: ShapeObject | TextObject) -> tuple:
    """What an object or word is, apart from where."""
    return (o.word, o.color, o.cap_height) if isinstance(o, TextObject) else (o.shape, o.color, o.size)


def _same(a: ShapeObject | TextObject, b: ShapeObject | TextObject, tolerance: float) -> bool:
    """Same form, centres within `tolerance` px per axis."""
    return _form(a) == _form(b) and abs(a.cx - b.cx) <= tolerance and abs(a.cy - b.cy) <= tolerance


def _unmatched(items: Sequence, others: Sequence, tolerance: float) -> list:
    """The items with no partner among `others` (`_same`, one partner each, nearest first)."""
    free = list(others)
    lonely = []
    for item in items:
        partners = [o for o in free if _same(item, o, tolerance)]
        if partners:
            free.remove(min(partners, key=lambda o: abs(o.cx - item.cx) + abs(o.cy - item.cy)))
        else:
            lonely.append(item)
    return lonely


def _differences(scene: Scene, reference: Scene, tolerance: float) -> tuple[list, list]:
    """(what `scene` draws that `reference` has not, what `reference` has that `scene` does not draw): objects and
    words, each unmatched in that form within `tolerance` px."""
    texts, reference_texts = [t for t in (scene.text,) if t is not None], [t for t in (reference.text,) if t is not None]
    new = _unmatched(scene.objects, reference.objects, tolerance) + _unmatched(texts, reference_texts, tolerance)
    gone = _unmatched(reference.objects, scene.objects, tolerance) + _unmatched(reference_texts, texts, tolerance)
    return new, gone


def _boxes_mask(items: Iterable[ShapeObject | TextObject], size: int, pad: float) -> np.ndarray:
    """(S, S) bool: the items' boxes widened by `pad` px."""
    centres = np.arange(size) + 0.5  # pixel centres
    mask = np.zeros((size, size), bool)
    for o in items:
        hw, hh = (o.width / 2, o.height / 2) if isinstance(o, TextObject) else (o.size / 2, o.size / 2)
        mask |= (np.abs(centres[:, None] - o.cy) <= hh + pad) & (np.abs(centres[None, :] - o.cx) <= hw + pad)
    return mask


def changed_region(
    ids: TokenIds, reference_ids: TokenIds, pad: float = 2.0, vocab: SemanticVocab = DEFAULT_VOCAB, tolerance: float = KEEP_TOLERANCE,
) -> np.ndarray:
    """(S, S) bool, True where an edit's blueprint `ids` draws something other than its reference's blueprint:
    the boxes, widened by `pad` px (anti-aliased edges), of every object and word that either scene has and the
    other has not in that form within `tolerance` px (`KEEP_TOLERANCE`); the whole canvas when the background
    changes. Where it is False the edit keeps the reference (`Pipeline.edit`'s `preserve_unchanged`)."""
    scene, reference = decode_tokens(ids, vocab), decode_tokens(reference_ids, vocab)
    size = vocab.config.canvas
    if scene.background != reference.background:
        return np.ones((size, size), bool)
    new, gone = _differences(scene, reference, tolerance)
    return _boxes_mask(new + gone, size, pad)


def kept_on_new_background(
    ids: TokenIds, reference_ids: TokenIds, vocab: SemanticVocab = DEFAULT_VOCAB, tolerance: float = KEEP_TOLERANCE,
) -> tuple[str, np.ndarray] | None:
    """For an edit whose blueprint `ids` changes its reference's background: (the reference's background, (S, S)
    bool boxes of the reference's objects and word that the edit keeps, in that form within `tolerance` px);
    None when the background stays (`changed_region` then says what is kept). Their ink can keep the reference's
    pixels over the new background (`Pipeline.edit`)."""
    scene, reference = decode_tokens(ids, vocab), decode_tokens(reference_ids, vocab)
    if scene.background == reference.background:
        return None
    _, gone = _differences(scene, reference, tolerance)
    kept = [o for o in (*reference.objects, *((reference.text,) if reference.text else ())) if all(o is not g for g in gone)]
    return reference.background, _boxes_mask(kept, vocab.config.canvas, pad=0.0)


def encode_batch(scenes: Iterable[Scene], vocab: SemanticVocab = DEFAULT_VOCAB) -> np.ndarray:
    """(B, seq_len) int64 ids of several scenes."""
    return np.asarray([encode_scene(s, vocab) for s in scenes], np.int64).reshape(-1, vocab.config.seq_len)


def decode_batch(ids: np.ndarray | Sequence[TokenIds], vocab: SemanticVocab = DEFAULT_VOCAB) -> list[Scene]:
    """The scenes of a (B, seq_len) batch of ids."""
    return [decode_tokens(row, vocab) for row in ids]
