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

from ...shapeworld.render import SUPERSAMPLE, font_for_cap_height
from ...shapeworld.world import CAP_HEIGHT_RANGE, MAX_WORD_LEN, scale

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
BEAM = 5
FIRST_LETTERS = 6
CAP_CANDIDATES = 2  # font sizes decoded in full, the best by their first-letter fit
BLUR_LEVELS = (0.0, 0.5, 0.8, 1.1)  # Gaussian sigmas (canvas px) of the template sets; the image's is estimated
FIRST_DX = np.arange(-3, 4)  # first-letter placements around the estimated ink left and capital top, 4x px
FIRST_DY = np.arange(-4, 5)


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
    """4x ink masks (uint8) of the 26 capitals, their ink offsets and advances, and the capital top."""
    font = font_for_cap_height(cap4)
    masks, lefts, tops = [], [], []
    for ch in LETTERS:
        left, top, right, bottom = font.getbbox(ch)
        im = Image.new("L", (right - left + 8, bottom - top + 8), 0)
        ImageDraw.Draw(im).text((4 - left, 4 - top), ch, fill=255, font=font)
        a = np.asarray(im)
        rows, cols = np.nonzero(a.any(axis=1))[0], np.nonzero(a.any(axis=0))[0]
        masks.append(a[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
        lefts.append(left + int(cols[0]) - 4)
        tops.append(top + int(rows[0]) - 4)
    return masks, lefts, tops, [font.getlength(ch) for ch in LETTERS], font.getbbox("H")[1]


def _phase_sums(n: int, phases: int) -> np.ndarray:
    """(phases, n, 4n) 0/1 matrices: row R of phase p sums the 4x samples 4R - p .. 4R - p + 3, i.e. the
    1x pixel R of ink shifted by p sub-pixels."""
    u = np.arange(n * SUPERSAMPLE)[None, None, :] - (SUPERSAMPLE * np.arange(n)[None, :, None] - np.arange(phases)[:, None, None])
    return ((u >= 0) & (u < SUPERSAMPLE)).astype(np.float32)


@lru_cache(maxsize=128)
def _sharp_templates(cap4: int, pad: int, phases: int = SUPERSAMPLE) -> np.ndarray:
    """(26, phases, phases, Hf, Wf) unblurred templates in a frame with `pad` px around the largest ink box.

    Phase (py, px) puts the ink top-left at 4x offset (pad * 4 + py, pad * 4 + px) of the frame. The 4 x 4
    box sums of all letters and phases are two batched products with 0/1 matrices (exact: integer sums)."""
    masks = _glyph_masks(cap4)[0]
    hf = -(-(max(m.shape[0] for m in masks) + SUPERSAMPLE) // SUPERSAMPLE) + 2 * pad
    wf = -(-(max(m.shape[1] for m in masks) + SUPERSAMPLE) // SUPERSAMPLE) + 2 * pad
    o = SUPERSAMPLE * pad
    ink = np.zeros((len(LETTERS), hf * SUPERSAMPLE, wf * SUPERSAMPLE), np.float32)
    for i, m in enumerate(masks):
        ink[i, o : o + m.shape[0], o : o + m.shape[1]] = m
    rows = _phase_sums(hf, phases)[:, None] @ ink[None]  # (py, 26, Hf, 4 Wf)
    sums = rows[:, :, None] @ _phase_sums(wf, phases).transpose(0, 2, 1)[None, None]  # (py, 26, px, Hf, Wf)
    templates = np.ascontiguousarray(sums.transpose(1, 0, 2, 3, 4)) / np.float32(SUPERSAMPLE * SUPERSAMPLE * 255)
    templates.setflags(write=False)  # cached, and shared by the unblurred bank
    return templates


def _blur(templates: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of the last two axes (canvas px), zero outside the frame."""
    if sigma == 0:
        return templates
    return ndimage.gaussian_filter(templates, sigma=(0,) * (templates.ndim - 2) + (sigma, sigma), mode="constant")


def _sharpness(templates: np.ndarray) -> float:
    """Mean over letters of sum(t^2)/sum(t) of (26, Hf, Wf) templates."""
    flat = templates.reshape(len(LETTERS), -1)
    return float(np.mean((flat**2).sum(1) / flat.sum(1)))


def _pad_for(sigma: float) -> int:
    return int(np.ceil(2 * sigma))


@lru_cache(maxsize=128)
def glyph_bank(cap4: int, sigma: float = 0.0) -> GlyphBank:
    """The templates of the font size with 4x capital height cap4, blurred by sigma (canvas px)."""
    _, lefts, tops, advances, cap_top = _glyph_masks(cap4)
    pad = _pad_for(sigma)
    templates = _blur(_sharp_templates(cap4, pad), sigma)
    sharpness = _sharpness(templates[:, 0, 0])
    return GlyphBank(cap4, sigma, pad, templates, np.asarray(lefts), np.asarray(tops), np.asarray(advances), cap_top, sharpness)


@lru_cache(maxsize=256)
def _level_sharpness(cap4: int, sigma: float) -> float:
    """glyph_bank(cap4, sigma).sharpness from the phase-0 templates alone (no full bank for the blur estimate)."""
    return _sharpness(_blur(_sharp_templates(cap4, _pad_for(sigma), phases=1)[:, 0, 0], sigma))


def estimate_blur(region: np.ndarray, cap4: int) -> float:
    """The blur level whose glyph templates are as sharp (sum a^2 / sum a) as the observed ink."""
    observed = float((region**2).sum() / max(region.sum(), 1e-6))
    return min(BLUR_LEVELS, key=lambda s: abs(_level_sharpness(cap4, s) - observed))


@dataclass(frozen=True)
class _Page:
    """The zero-padded coverage region being read with one bank, and its glyph-frame windows (a view)."""

    bank: GlyphBank
    region: np.ndarray
    windows: np.ndarray  # (H - Hf + 1, W - Wf + 1, Hf, Wf)


def _page(bank: GlyphBank, region: np.ndarray) -> _Page:
    hf, wf = bank.templates.shape[-2:]
    padded = np.zeros((region.shape[0] + 2 * hf, region.shape[1] + 2 * wf), region.dtype)
    padded[hf:-hf, wf:-wf] = region
    return _Page(bank, padded, sliding_window_view(padded, (hf, wf)))


@dataclass(frozen=True)
class _Beam:
    """Hypotheses with words of one length, in padded-region coordinates."""

    words: tuple[str, ...]
    pen_x: np.ndarray  # (B,) 4x pen position for the next letter (before the first letter: its ink left)
    origin_y: np.ndarray  # (B,) 4x 'la' origin row
    canvases: np.ndarray  # (B, H, W) predicted coverage over the padded region
    residuals: np.ndarray  # (B, H, W) padded region minus canvas, kept so that scoring gathers one window
    errors: np.ndarray  # (B,) squared error of each canvas against the padded region


@dataclass(frozen=True)
class WordReading:
    word: str
    cap_height: float  # canvas px
    left: float  # ink box in region px
    top: float
    right: float
    bottom: float
    error: float  # squared error per unit of ink


def _distinct_best(errors: np.ndarray, words: tuple[str, ...], letters: np.ndarray, keep: int) -> np.ndarray:
    """Flat indices into errors (B, L) of the `keep` best extensions with distinct words, best first
    (ties by position): a word's first candidate in the stable order stands for it."""
    order = np.argsort(errors, axis=None, kind="stable")
    if len(set(words)) < len(words):  # equal prefixes (the empty one): extensions can repeat a word
        prefix = {w: i for i, w in enumerate(dict.fromkeys(words))}
        word_ids = (np.asarray([prefix[w] for w in words])[:, None] * len(LETTERS) + letters[None]).ravel()
        _, first = np.unique(word_ids[order], return_index=True)
        order = order[np.sort(first)]
    return order[:keep]


def _expand(page: _Page, beam: _Beam, keep: int, letters: np.ndarray | None = None) -> _Beam:
    """The `keep` best one-letter extensions of the beam (by `letters`, default all), with distinct words.

    All (hypothesis, letter) pairs are scored in one gather: the error changes only inside the new glyph's frame.
    """
    bank, region = page.bank, page.region
    letters = np.arange(len(LETTERS)) if letters is None else letters
    hf, wf = bank.templates.shape[-2:]
    first = not beam.words[0]
    x4 = np.rint(beam.pen_x[:, None] + np.where(first, 0.0, bank.ink_left[letters])[None]).astype(np.int64)  # (B, L)
    y4 = beam.origin_y[:, None] + bank.ink_top[letters][None]
    x4 = np.minimum(np.maximum(x4, SUPERSAMPLE * bank.pad), SUPERSAMPLE * (region.shape[1] - wf + bank.pad))
    y4 = np.minimum(np.maximum(y4, SUPERSAMPLE * bank.pad), SUPERSAMPLE * (region.shape[0] - hf + bank.pad))
    r0, c0 = y4 // SUPERSAMPLE - bank.pad, x4 // SUPERSAMPLE - bank.pad
    if first:  # every hypothesis still sees the bare region
        residual = page.windows[r0, c0]  # (B, L, hf, wf)
    else:
        residual = sliding_window_view(beam.residuals, (hf, wf), axis=(1, 2))[np.arange(len(beam.words))[:, None], r0, c0]
    t = bank.templates[letters[None], y4 % SUPERSAMPLE, x4 % SUPERSAMPLE]
    errors = beam.errors[:, None] + ((residual - t) ** 2 - residual**2).sum(axis=(2, 3))
    b, j = np.divmod(_distinct_best(errors, beam.words, letters, keep), len(letters))
    canvases, residuals = beam.canvases[b], beam.residuals[b]
    for n in range(len(b)):
        frame = np.s_[r0[b[n], j[n]] : r0[b[n], j[n]] + hf, c0[b[n], j[n]] : c0[b[n], j[n]] + wf]
        canvases[n][frame] += t[b[n], j[n]]
        residuals[n][frame] = region[frame] - canvases[n][frame]
    i = letters[j]
    return _Beam(
        words=tuple(beam.words[bn] + LETTERS[ii] for bn, ii in zip(b, i)),
        pen_x=(x4[b, j] - bank.ink_left[i] + bank.advance[i]).astype(np.float64),
        origin_y=beam.origin_y[b],
        canvases=canvases,
        residuals=residuals,
        errors=errors[b, j],
    )


def _start(page: _Page, pen_x: np.ndarray, origin_y: np.ndarray) -> _Beam:
    """Empty hypotheses at the given first-letter placements (sharing one blank canvas)."""
    shape = (len(pen_x),) + page.region.shape
    blank = np.broadcast_to(np.zeros_like(page.region), shape)
    errors = np.full(len(pen_x), float((page.region**2).sum()))
    return _Beam(("",) * len(pen_x), pen_x.astype(np.float64), origin_y, blank, np.broadcast_to(page.region, shape), errors)


def _first_letters(page: _Page, left4: int, top4: int) -> _Beam:
    """Beam after the first letter: a shortlist at the estimated placement, then placements around it for the shortlist.

    (left4, top4) estimate the 4x ink left and capital top; the ink may start up to 3 (4) sub-pixels either side.
    """
    origin = top4 - page.bank.cap_top
    # The top ink row may be a round letter's overshoot or a blurred bar: shortlist from a pixel either side too.
    centres = _start(page, np.full(3, left4 + 1), origin + np.asarray([-SUPERSAMPLE, 0, SUPERSAMPLE]))
    shortlist = np.asarray([LETTERS.index(w) for w in _expand(page, centres, FIRST_LETTERS).words])
    dy, dx = np.repeat(FIRST_DY, len(FIRST_DX)), np.tile(FIRST_DX, len(FIRST_DY))
    return _expand(page, _start(page, left4 + dx, origin + dy), FIRST_LETTERS, letters=shortlist)


def _decode(page: _Page, beam: _Beam) -> tuple[str, np.ndarray, float]:
    """Best word of 1-4 letters (word, canvas, error), continuing a first-letter beam (ties: the earliest)."""
    best = beam
    best_n = int(np.argmin(beam.errors))
    for _ in range(MAX_WORD_LEN - 1):
        beam = _expand(page, beam, BEAM)
        n = int(np.argmin(beam.errors))
        if beam.errors[n] < best.errors[best_n]:
            best, best_n = beam, n
    return best.words[best_n], best.canvases[best_n], float(best.errors[best_n])


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
    tried = []  # (error after the first letter, page, beam)
    for cap64 in caps64:
        cap4 = max(4, int(round(cap64 * scale(canvas) * SUPERSAMPLE)))
        page = _page(glyph_bank(cap4, estimate_blur(region, cap4)), region)
        hf, wf = page.bank.templates.shape[-2:]
        beam = _first_letters(page, SUPERSAMPLE * (int(ink_cols[0]) + wf), SUPERSAMPLE * (int(ink_rows[0]) + hf))
        tried.append((float(beam.errors[0]), page, beam))
    tried.sort(key=lambda t: t[0])
    decoded = [(_decode(page, beam), page.bank) for _, page, beam in tried[:CAP_CANDIDATES]]
    (word, canvas_pred, error), bank = min(decoded, key=lambda d: d[0][2])
    hf, wf = bank.templates.shape[-2:]
    rows = np.nonzero((canvas_pred >= 0.5).any(axis=1))[0]
    cols = np.nonzero((canvas_pred >= 0.5).any(axis=0))[0]
    if len(rows) == 0:
        return None
    return WordReading(
        word=word,
        cap_height=bank.cap4 / SUPERSAMPLE,
        left=float(cols[0] - wf),
        top=float(rows[0] - hf),
        right=float(cols[-1] + 1 - wf),
        bottom=float(rows[-1] + 1 - hf),
        error=error / max(float(region.sum()), 1.0),
    )
