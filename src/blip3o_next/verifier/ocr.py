"""Reading the ShapeWorld word: template matching against Pillow's default font.

Written by hand because the world's text is one known font at a known size range:
a general OCR engine (Tesseract, a neural model) would need downloads, be slower and
read 10-pixel capitals worse than matching the exact glyphs. The word is decoded by a
small beam search, one letter at a time, each letter placed at the font's advance
from the previous one, scored by squared error against the observed ink coverage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw

from ..shapeworld.render import SUPERSAMPLE, font_for_cap_height
from ..shapeworld.world import CAP_HEIGHT_RANGE, MAX_WORD_LEN, scale

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BEAM = 5
FIRST_LETTERS = 6
CAP_CANDIDATES = 2  # font sizes decoded in full, the best by their first-letter fit


@dataclass(frozen=True)
class GlyphBank:
    """Per-letter 1x coverage templates at every 4x sub-pixel phase, for one font size."""

    cap4: int
    templates: np.ndarray  # (26, 4 py, 4 px, Hf, Wf): glyph ink top-left at 4x offset (px, py) in the frame
    ink_left: np.ndarray  # (26,) ink left relative to the pen origin, 4x px
    ink_top: np.ndarray  # (26,) ink top relative to the 'la' origin, 4x px
    ink_right: np.ndarray  # (26,) ink right edge relative to the ink left, 4x px
    advance: np.ndarray  # (26,) pen advance, 4x px
    cap_top: int  # top of 'H' relative to the 'la' origin, 4x px


@lru_cache(maxsize=64)
def glyph_bank(cap4: int) -> GlyphBank:
    font = font_for_cap_height(cap4)
    masks, lefts, tops, rights = [], [], [], []
    for ch in LETTERS:
        left, top, right, bottom = font.getbbox(ch)
        im = Image.new("L", (right - left + 8, bottom - top + 8), 0)
        ImageDraw.Draw(im).text((4 - left, 4 - top), ch, fill=255, font=font)
        a = np.asarray(im, np.float32) / 255.0
        rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
        masks.append(a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        lefts.append(left + cols[0] - 4)
        tops.append(top + rows[0] - 4)
        rights.append(cols[-1] + 1 - cols[0])
    hf = -(-(max(m.shape[0] for m in masks) + SUPERSAMPLE) // SUPERSAMPLE)
    wf = -(-(max(m.shape[1] for m in masks) + SUPERSAMPLE) // SUPERSAMPLE)
    templates = np.zeros((len(LETTERS), SUPERSAMPLE, SUPERSAMPLE, hf, wf), np.float32)
    for i, m in enumerate(masks):
        for py in range(SUPERSAMPLE):
            for px in range(SUPERSAMPLE):
                big = np.zeros((hf * SUPERSAMPLE, wf * SUPERSAMPLE), np.float32)
                big[py : py + m.shape[0], px : px + m.shape[1]] = m
                templates[i, py, px] = big.reshape(hf, SUPERSAMPLE, wf, SUPERSAMPLE).mean(axis=(1, 3))
    return GlyphBank(
        cap4=cap4,
        templates=templates,
        ink_left=np.asarray(lefts),
        ink_top=np.asarray(tops),
        ink_right=np.asarray(rights),
        advance=np.asarray([font.getlength(ch) for ch in LETTERS]),
        cap_top=font.getbbox("H")[1],
    )


@dataclass
class _Hypothesis:
    word: str
    pen_x: float  # 4x pen position for the next letter (for the first letter: its ink left), padded-region coordinates
    origin_y: int  # 4x 'la' origin row, padded-region coordinates
    canvas: np.ndarray  # predicted coverage over the padded region
    error: float  # squared error of `canvas` against the padded region


@dataclass(frozen=True)
class WordReading:
    word: str
    cap_height: float  # canvas px
    left: float  # ink box in region px
    top: float
    right: float
    bottom: float
    error: float  # squared error per unit of ink


def _expand(bank: GlyphBank, beam: list[_Hypothesis], region: np.ndarray, keep: int, letters: np.ndarray | None = None) -> list[_Hypothesis]:
    """The `keep` best one-letter extensions of the beam (by `letters`, default all), with distinct words.

    All (hypothesis, letter) pairs are scored in one gather: the error changes only inside the new glyph's frame.
    """
    letters = np.arange(len(LETTERS)) if letters is None else letters
    n_letters = len(letters)
    hf, wf = bank.templates.shape[-2:]
    pen = np.asarray([h.pen_x for h in beam])[:, None]
    first = np.asarray([not h.word for h in beam])[:, None]
    x4 = np.rint(pen + np.where(first, 0.0, bank.ink_left[letters][None])).astype(np.int64)  # (B, L)
    y4 = np.asarray([h.origin_y for h in beam])[:, None] + bank.ink_top[letters][None]
    x4 = np.clip(x4, 0, SUPERSAMPLE * (region.shape[1] - wf))
    y4 = np.clip(y4, 0, SUPERSAMPLE * (region.shape[0] - hf))
    r0, c0 = y4 // SUPERSAMPLE, x4 // SUPERSAMPLE
    canvases = np.stack([h.canvas for h in beam])
    observed = sliding_window_view(region, (hf, wf))[r0, c0]  # (B, 26, hf, wf)
    predicted = sliding_window_view(canvases, (hf, wf), axis=(1, 2))[np.arange(len(beam))[:, None], r0, c0]
    residual = observed - predicted
    t = bank.templates[letters[None], y4 % SUPERSAMPLE, x4 % SUPERSAMPLE]
    errors = np.asarray([h.error for h in beam])[:, None] + ((residual - t) ** 2 - residual**2).sum(axis=(2, 3))
    out: list[_Hypothesis] = []
    seen: set[str] = set()
    for flat in np.argsort(errors, axis=None, kind="stable"):
        b, j = divmod(int(flat), n_letters)
        i = int(letters[j])
        word = beam[b].word + LETTERS[i]
        if word in seen:
            continue
        seen.add(word)
        canvas = beam[b].canvas.copy()
        canvas[r0[b, j] : r0[b, j] + hf, c0[b, j] : c0[b, j] + wf] += t[b, j]
        pen_x = x4[b, j] - bank.ink_left[i] + bank.advance[i]
        out.append(_Hypothesis(word, float(pen_x), beam[b].origin_y, canvas, float(errors[b, j])))
        if len(out) == keep:
            break
    return out


def _first_letters(bank: GlyphBank, region: np.ndarray, left4: int, top4: int) -> list[_Hypothesis]:
    """Beam after the first letter: a shortlist at the estimated placement, then placements around it for the shortlist.

    (left4, top4) estimate the 4x ink left and capital top; the ink may start up to 3 sub-pixels either side.
    """
    empty = np.zeros_like(region)
    total = float((region**2).sum())
    origin = top4 - bank.cap_top
    beam = [_Hypothesis("", left4 + dx, origin + dy, empty, total) for dy in range(-2, 4) for dx in range(-3, 4)]
    centre = [_Hypothesis("", left4 + 1, origin, empty, total)]
    shortlist = np.asarray([LETTERS.index(h.word) for h in _expand(bank, centre, region, FIRST_LETTERS)])
    return _expand(bank, beam, region, FIRST_LETTERS, letters=shortlist)


def _decode(bank: GlyphBank, region: np.ndarray, beam: list[_Hypothesis]) -> _Hypothesis:
    """Best word of 1-4 letters, continuing a first-letter beam."""
    finished = list(beam)
    for _ in range(MAX_WORD_LEN - 1):
        beam = _expand(bank, beam, region, BEAM)
        finished.extend(beam)
    return min(finished, key=lambda h: h.error)


def read_word(region: np.ndarray, canvas: int) -> WordReading | None:
    """Read the word in `region`, an ink-coverage map (values 0..1) around the text."""
    rows50 = np.nonzero((region >= 0.5).any(axis=1))[0]
    ink_rows = np.nonzero((region >= 0.25).any(axis=1))[0]
    ink_cols = np.nonzero((region >= 0.25).any(axis=0))[0]
    if len(rows50) == 0:
        return None
    height = (rows50[-1] + 1 - rows50[0]) / scale(canvas)  # px at S = 64; Q's tail makes it taller than the capitals
    lo, hi = CAP_HEIGHT_RANGE
    caps64 = [c for c in range(lo - 1, hi + 2) if height - 1.5 <= c <= height + 1.0] or [min(max(round(height), lo), hi)]
    tried = []  # (error after the first letter, bank, padded region, beam)
    for cap64 in caps64:
        bank = glyph_bank(max(4, int(round(cap64 * scale(canvas) * SUPERSAMPLE))))
        hf, wf = bank.templates.shape[-2:]
        padded = np.pad(region, ((hf, hf), (wf, wf)))
        r0, c0 = int(ink_rows[0]) + hf, int(ink_cols[0]) + wf
        beam = _first_letters(bank, padded, SUPERSAMPLE * c0, SUPERSAMPLE * r0)
        tried.append((beam[0].error, bank, padded, beam))
    tried.sort(key=lambda t: t[0])
    decoded = [(_decode(bank, padded, beam), bank) for _, bank, padded, beam in tried[:CAP_CANDIDATES]]
    hyp, bank = min(decoded, key=lambda d: d[0].error)
    hf, wf = bank.templates.shape[-2:]
    rows = np.nonzero((hyp.canvas >= 0.5).any(axis=1))[0]
    cols = np.nonzero((hyp.canvas >= 0.5).any(axis=0))[0]
    if len(rows) == 0:
        return None
    return WordReading(
        word=hyp.word,
        cap_height=bank.cap4 / SUPERSAMPLE,
        left=float(cols[0] - wf),
        top=float(rows[0] - hf),
        right=float(cols[-1] + 1 - wf),
        bottom=float(rows[-1] + 1 - hf),
        error=hyp.error / max(float(region.sum()), 1.0),
    )
