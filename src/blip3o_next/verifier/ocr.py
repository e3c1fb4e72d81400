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
from scipy import ndimage

from ..shapeworld.render import SUPERSAMPLE, font_for_cap_height
from ..shapeworld.world import CAP_HEIGHT_RANGE, MAX_WORD_LEN, scale

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BEAM = 5
FIRST_LETTERS = 6
CAP_CANDIDATES = 2  # font sizes decoded in full, the best by their first-letter fit
BLUR_LEVELS = (0.0, 0.5, 0.8, 1.1)  # Gaussian sigmas (canvas px) of the template sets; the image's is estimated


@dataclass(frozen=True)
class GlyphBank:
    """Per-letter 1x coverage templates at every 4x sub-pixel phase, for one font size and blur."""

    cap4: int
    sigma: float
    pad: int  # 1x px between the frame edge and the glyph's ink box (room for the blur)
    templates: np.ndarray  # (26, 4 py, 4 px, Hf, Wf): glyph ink top-left at 1x (pad, pad) + 4x offset (px, py)
    ink_left: np.ndarray  # (26,) ink left relative to the pen origin, 4x px
    ink_top: np.ndarray  # (26,) ink top relative to the 'la' origin, 4x px
    advance: np.ndarray  # (26,) pen advance, 4x px
    cap_top: int  # top of 'H' relative to the 'la' origin, 4x px
    sharpness: float  # mean over letters of sum(t^2)/sum(t): falls as blur grows


@lru_cache(maxsize=32)
def _glyph_masks(cap4: int) -> tuple[list[np.ndarray], list[int], list[int], list[float], int]:
    """4x ink masks of the 26 capitals, their ink offsets and advances, and the capital top."""
    font = font_for_cap_height(cap4)
    masks, lefts, tops = [], [], []
    for ch in LETTERS:
        left, top, right, bottom = font.getbbox(ch)
        im = Image.new("L", (right - left + 8, bottom - top + 8), 0)
        ImageDraw.Draw(im).text((4 - left, 4 - top), ch, fill=255, font=font)
        a = np.asarray(im, np.float32) / 255.0
        rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
        masks.append(a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        lefts.append(left + int(cols[0]) - 4)
        tops.append(top + int(rows[0]) - 4)
    return masks, lefts, tops, [font.getlength(ch) for ch in LETTERS], font.getbbox("H")[1]


@lru_cache(maxsize=128)
def glyph_bank(cap4: int, sigma: float = 0.0) -> GlyphBank:
    masks, lefts, tops, advances, cap_top = _glyph_masks(cap4)
    pad = int(np.ceil(2 * sigma))
    hf = -(-(max(m.shape[0] for m in masks) + SUPERSAMPLE) // SUPERSAMPLE) + 2 * pad
    wf = -(-(max(m.shape[1] for m in masks) + SUPERSAMPLE) // SUPERSAMPLE) + 2 * pad
    templates = np.zeros((len(LETTERS), SUPERSAMPLE, SUPERSAMPLE, hf, wf), np.float32)
    p4 = pad * SUPERSAMPLE
    for i, m in enumerate(masks):
        for py in range(SUPERSAMPLE):
            for px in range(SUPERSAMPLE):
                big = np.zeros((hf * SUPERSAMPLE, wf * SUPERSAMPLE), np.float32)
                big[p4 + py : p4 + py + m.shape[0], p4 + px : p4 + px + m.shape[1]] = m
                templates[i, py, px] = big.reshape(hf, SUPERSAMPLE, wf, SUPERSAMPLE).mean(axis=(1, 3))
    if sigma > 0:
        templates = ndimage.gaussian_filter(templates, sigma=(0, 0, 0, sigma, sigma), mode="constant")
    flat = templates[:, 0, 0].reshape(len(LETTERS), -1)
    sharpness = float(np.mean((flat**2).sum(1) / flat.sum(1)))
    return GlyphBank(cap4, sigma, pad, templates, np.asarray(lefts), np.asarray(tops), np.asarray(advances), cap_top, sharpness)


def estimate_blur(region: np.ndarray, cap4: int) -> float:
    """The blur level whose glyph templates are as sharp (sum a^2 / sum a) as the observed ink."""
    observed = float((region**2).sum() / max(region.sum(), 1e-6))
    return min(BLUR_LEVELS, key=lambda s: abs(glyph_bank(cap4, s).sharpness - observed))


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
    x4 = np.clip(x4, SUPERSAMPLE * bank.pad, SUPERSAMPLE * (region.shape[1] - wf + bank.pad))
    y4 = np.clip(y4, SUPERSAMPLE * bank.pad, SUPERSAMPLE * (region.shape[0] - hf + bank.pad))
    r0, c0 = y4 // SUPERSAMPLE - bank.pad, x4 // SUPERSAMPLE - bank.pad
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

    (left4, top4) estimate the 4x ink left and capital top; the ink may start up to 3 (4) sub-pixels either side.
    """
    empty = np.zeros_like(region)
    total = float((region**2).sum())
    origin = top4 - bank.cap_top
    beam = [_Hypothesis("", left4 + dx, origin + dy, empty, total) for dy in range(-4, 5) for dx in range(-3, 4)]
    # The top ink row may be a round letter's overshoot or a blurred bar: shortlist from a pixel either side too.
    centres = [_Hypothesis("", left4 + 1, origin + dy, empty, total) for dy in (-SUPERSAMPLE, 0, SUPERSAMPLE)]
    shortlist = np.asarray([LETTERS.index(h.word) for h in _expand(bank, centres, region, FIRST_LETTERS)])
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
        cap4 = max(4, int(round(cap64 * scale(canvas) * SUPERSAMPLE)))
        bank = glyph_bank(cap4, estimate_blur(region, cap4))
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
