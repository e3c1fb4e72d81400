"""The verifier: parse any RGB image of ShapeWorld back into a `Scene`.

Pipeline (batched where it pays):
1. background = median of the border pixels, named by the nearest background color;
2. every pixel is explained as background + alpha * (ink - background) for the ink color
   (8 object colors, black, white) with the smallest residual; alpha >= 0.5 is foreground.
   A 50% threshold keeps straight edges where they are under blur, and the background
   is measured, not assumed, so global color drift cancels;
3. connected components (8-connected), split when they hold two colors, specks dropped;
4. each component is fitted by all six shapes from its ink mass and centroid (both
   preserved by blur and averaged against noise) and the best-matching template wins;
5. black/white ink, or colored ink that fits no shape, is text: read by template OCR.

Per-image work stays inside each blob's bounding window (no canvas-sized masks per blob).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage

from ...shapeworld.render import block_sums, inside_shape
from ...shapeworld.world import BACKGROUNDS, COLORS, SHAPES, TEXT_INK, Scene, ShapeObject, TextObject, scale
from .ocr import BLUR_LEVELS, read_word

INKS = tuple(COLORS) + tuple(TEXT_INK)
INK_RGB = np.asarray([COLORS[c] for c in COLORS] + [TEXT_INK[c] for c in TEXT_INK], np.float32)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
BACKGROUND_RGB = np.asarray([BACKGROUNDS[b] for b in BACKGROUNDS], np.float32)
# Area of each shape as a fraction of its box, and how far its centroid lies below the box center (fraction of s).
AREA_FRACTION = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5, "diamond": 0.5, "star": None, "cross": 5 / 9}
CENTROID_DROP = {"triangle": 1 / 6}
EIGHT_CONNECTED = np.ones((3, 3), bool)
FIT_SUPERSAMPLE = 2  # sub-pixel grid of the shape templates used for classification (4 would be 4x slower, no more accurate)
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas, as scipy.ndimage.gaussian_filter


def _star_area_fraction() -> float:
    # Five kites of the star: 10 triangles (center, outer vertex, inner vertex) with angle 36 degrees at the center.
    R, r = 0.5, 0.5 * 0.45
    return 10 * 0.5 * R * r * np.sin(np.pi / 5)


AREA_FRACTION["star"] = _star_area_fraction()


@dataclass(frozen=True)
class ParserConfig:
    """Thresholds of the scene parser, in px at S = 64 where they are lengths or areas."""

    alpha_threshold: float = 0.5  # a blob needs a pixel this covered (the 50% edge stays put under blur)
    grow_threshold: float = 0.3  # blobs extend over pixels this covered, so blurred letter strokes stay whole
    min_shape_peak: float = 0.85  # shapes (s >= 10 px) keep a solid core under blur; thin strokes do not
    min_ink_distance: float = 60.0  # inks closer than this to the background (RGB distance) are not considered
    min_object_mass: float = 18.0  # smaller colored blobs are specks (the smallest shape, a star of s=10, has 33)
    min_text_height: float = 5.0  # black/white blobs shorter than this are specks (capitals are 10-14)
    min_text_mass: float = 4.0
    text_fit_error: float = 0.55  # colored blobs whose best shape fit is worse than this are read as text
    max_text_height: float = 18.0  # colored misfits taller than this stay (badly drawn) objects
    split_fraction: float = 0.2  # a second color holding this share of a blob splits it
    border: int = 2  # border width (px, canvas) used to measure the background


@dataclass(frozen=True)
class _Blob:
    """A connected piece of one ink: its mask over its tight bounding window (rows, cols) of the canvas."""

    rows: slice
    cols: slice
    mask: np.ndarray
    ink: int


@dataclass(frozen=True)
class _Pixels:
    """One image's per-pixel measurements, shared by all of its blobs."""

    diff: np.ndarray  # (S, S, 3) image minus background color
    directions: np.ndarray  # (K, 3) ink minus background color
    ink: np.ndarray  # (S, S) best ink index
    alpha: np.ndarray  # (S, S) coverage of that ink


def _to_float_batch(images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"expected square RGB images shaped (N, S, S, 3), got {batch.shape}")
    return batch.astype(np.float32)


def _paste(mask: np.ndarray, rows: slice, cols: slice, window: tuple[slice, slice]) -> np.ndarray:
    """A mask over (rows, cols) as a mask over the enclosing window."""
    r, c = window
    out = np.zeros((r.stop - r.start, c.stop - c.start), bool)
    out[rows.start - r.start : rows.stop - r.start, cols.start - c.start : cols.stop - c.start] = mask
    return out


def _dilate8(mask: np.ndarray) -> np.ndarray:
    """3 x 3 binary dilation with nothing outside the array (as ndimage.binary_dilation), done separably."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


@lru_cache(maxsize=512)
def _blur_matrices(n: int) -> np.ndarray:
    """(len(BLUR_LEVELS), n, n): each level's 1-d Gaussian blur of n samples with zero padding
    (ndimage.gaussian_filter's kernel and mode='constant'; sigma 0 is the identity), as matrices so that
    all templates are blurred by two batched products instead of one filter call per template and level.
    The kernel is symmetric, so each matrix is its own transpose."""
    out = np.zeros((len(BLUR_LEVELS), n, n), np.float32)
    offset = np.arange(n)[None, :] - np.arange(n)[:, None]  # column minus row
    for i, sigma in enumerate(BLUR_LEVELS):
        if sigma == 0:
            out[i] = np.eye(n)
            continue
        radius = int(BLUR_TRUNCATE * sigma + 0.5)
        kernel = np.exp(-0.5 / (sigma * sigma) * np.arange(-radius, radius + 1) ** 2)
        kernel /= kernel.sum()
        out[i] = np.where(np.abs(offset) <= radius, kernel[np.clip(offset + radius, 0, 2 * radius)], 0.0)
    out.setflags(write=False)
    return out


def _shape_templates(cx: float, cys: list[float], sizes: list[float], x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """(shapes, h, w) coverage of every shape (centred at cx and its cy, of its size) over the window at (x0, y0):
    shape_coverage on the FIT_SUPERSAMPLE grid, with the sample grid built once and one reduction for all shapes."""
    k = FIT_SUPERSAMPLE
    offsets = (np.arange(k, dtype=np.float32) + 0.5) / k
    xs = (x0 + np.arange(w, dtype=np.float32)[:, None] + offsets[None, :]).reshape(1, -1) - cx
    ys = (y0 + np.arange(h, dtype=np.float32)[:, None] + offsets[None, :]).reshape(-1, 1)
    inside = np.stack([inside_shape(shape, xs, ys - cy, size) for shape, cy, size in zip(SHAPES, cys, sizes)])
    return block_sums(inside.view(np.uint8), k).astype(np.float32) / np.float32(k * k)


class SceneParser:
    """Batched scene parser. `parser(images)` -> list of `Scene` (one per image)."""

    def __init__(self, config: ParserConfig | None = None):
        self.config = config or ParserConfig()

    def __call__(self, images: np.ndarray | list[np.ndarray]) -> list[Scene]:
        return self.parse_batch(images)

    def parse(self, image: np.ndarray) -> Scene:
        return self.parse_batch(image[None])[0]

    def parse_batch(self, images: np.ndarray | list[np.ndarray]) -> list[Scene]:
        cfg = self.config
        batch = _to_float_batch(images)
        N, S = batch.shape[:2]
        b = cfg.border
        border = np.concatenate(
            [batch[:, :b].reshape(N, -1, 3), batch[:, -b:].reshape(N, -1, 3), batch[:, b:-b, :b].reshape(N, -1, 3), batch[:, b:-b, -b:].reshape(N, -1, 3)],
            axis=1,
        )
        bg_rgb = np.median(border, axis=1)  # (N, 3)
        bg_names = np.argmin(((bg_rgb[:, None] - BACKGROUND_RGB[None]) ** 2).sum(-1), axis=1)
        directions = INK_RGB[None] - bg_rgb[:, None]  # (N, K, 3)
        diff = batch - bg_rgb[:, None, None]  # (N, S, S, 3)
        ink, alpha = self._classify_pixels(diff, bg_rgb, directions)
        foreground = alpha >= cfg.grow_threshold  # hysteresis: blobs also need a pixel >= alpha_threshold
        structure = np.zeros((3, 3, 3), bool)
        structure[1] = EIGHT_CONNECTED  # components never connect across images of the batch
        labels, _ = ndimage.label(foreground, structure=structure)
        slices = ndimage.find_objects(labels)
        per_image: list[list[int]] = [[] for _ in range(N)]
        for lab, sl in enumerate(slices, start=1):
            if sl is not None:
                per_image[sl[0].start].append(lab)
        return [
            self._parse_image(
                _Pixels(diff[n], directions[n], ink[n], alpha[n]), labels[n], per_image[n], slices, BACKGROUND_NAMES[bg_names[n]]
            )
            for n in range(N)
        ]

    def _classify_pixels(self, diff: np.ndarray, bg_rgb: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel, the ink that best explains it as background + alpha * (ink - background), and that alpha.

        Only pixels visibly off the background are examined; the rest get alpha 0. The projection on
        (ink - background) is taken as diff . ink - diff . background: one small product instead of a
        per-pixel gather of the directions (the same values: for uint8 images every term is a small
        multiple of 1/4, exact in float32).
        """
        cfg = self.config
        N, S = diff.shape[:2]
        norm2 = (directions**2).sum(-1)  # (N, K)
        d2 = diff[..., 0] ** 2 + diff[..., 1] ** 2 + diff[..., 2] ** 2  # (N, S, S); faster than a sum over the size-3 axis
        idx = np.flatnonzero(d2 >= (0.25 * cfg.min_ink_distance) ** 2)  # flat pixel indices: one index array, not three
        n = idx // (S * S)
        px = diff.reshape(-1, 3)[idx]  # (P, 3)
        bg = np.take(bg_rgb, n, axis=0)  # np.take: much faster than fancy indexing of rows
        proj = px @ INK_RGB.T - (px[:, 0] * bg[:, 0] + px[:, 1] * bg[:, 1] + px[:, 2] * bg[:, 2])[:, None]  # (P, K)
        norm2_px = np.take(norm2, n, axis=0)
        a = np.clip(proj / np.maximum(norm2_px, 1.0), 0.0, 1.0)
        residual = d2.reshape(-1)[idx][:, None] - 2 * a * proj + a * a * norm2_px
        residual[norm2_px < cfg.min_ink_distance**2] = np.inf
        best = residual.argmin(-1)
        ink = np.zeros(d2.size, np.intp)
        alpha = np.zeros(d2.size, np.float32)
        ink[idx] = best
        alpha[idx] = a.reshape(-1)[np.arange(len(best)) * a.shape[1] + best]
        return ink.reshape(N, S, S), alpha.reshape(N, S, S)

    # ------------------------------------------------------------------ per image

    def _parse_image(self, px: _Pixels, labels: np.ndarray, labs: list[int], slices: list, background: str) -> Scene:
        cfg = self.config
        S = labels.shape[0]
        k = scale(S)
        blobs: list[_Blob] = []
        for lab in labs:
            rows, cols = slices[lab - 1][1:]
            blobs.extend(self._split_by_color(rows, cols, labels[rows, cols] == lab, px))
        occupied = np.zeros(labels.shape, bool)
        for blob in blobs:
            occupied[blob.rows, blob.cols] |= blob.mask
        objects: list[ShapeObject] = []
        text_candidates: list[tuple[_Blob, float]] = []  # (blob, mass)
        for blob in blobs:
            peak = float(px.alpha[blob.rows, blob.cols][blob.mask].max())
            if peak < cfg.alpha_threshold:
                continue
            soft, window = self._soft_alpha(blob.rows, blob.cols, blob.mask, occupied, px.diff, px.directions[blob.ink])
            mass = float(soft.sum())
            color = INKS[blob.ink]
            if color in TEXT_INK or mass < cfg.min_object_mass * k * k or peak < cfg.min_shape_peak:
                text_candidates.append((blob, mass))  # letters, fragments of letters, or specks
                continue
            obj, err = self._fit_shape(soft, window, mass, color)
            height = (window[0].stop - window[0].start - 4) / k
            if err > cfg.text_fit_error and height <= cfg.max_text_height:
                text_candidates.append((blob, mass))
            else:
                objects.append(obj)
        text_blobs = self._group_text(text_candidates, S)
        text = self._read_text(text_blobs, occupied, px, S) if text_blobs else None
        objects.sort(key=lambda o: (o.cx, o.cy))
        return Scene(canvas=S, background=background, objects=tuple(objects), text=text)

    def _group_text(self, candidates: list[tuple[_Blob, float]], S: int) -> list[_Blob]:
        """The word's pieces: candidates of the dominant ink in the row band of its largest piece.

        Returns nothing when they are too small or too short to be a word (specks)."""
        cfg = self.config
        k = scale(S)
        if not candidates:
            return []
        totals = np.zeros(len(INKS))
        for blob, mass in candidates:
            totals[blob.ink] += mass
        ink_index = int(totals.argmax())
        pieces = [(blob, mass) for blob, mass in candidates if blob.ink == ink_index]
        pieces.sort(key=lambda p: -p[1])
        anchor = pieces[0][0]
        if anchor.rows.stop - anchor.rows.start < cfg.min_text_height * k:
            return []  # even blurred, a word keeps at least one letter-sized piece
        reach = cfg.max_text_height * k / 2
        members = [pieces[0]]
        top, bottom, left, right = anchor.rows.start, anchor.rows.stop, anchor.cols.start, anchor.cols.stop
        rest = pieces[1:]
        grew = True
        while grew:  # grow the word from its anchor by pieces within reach, until none is left in reach
            grew = False
            for i in reversed(range(len(rest))):
                t, b, l, r = rest[i][0].rows.start, rest[i][0].rows.stop, rest[i][0].cols.start, rest[i][0].cols.stop
                if b > top - reach and t < bottom + reach and l < right + reach and r > left - reach:
                    members.append(rest.pop(i))
                    top, bottom, left, right = min(top, t), max(bottom, b), min(left, l), max(right, r)
                    grew = True
        if sum(ms for _, ms in members) < cfg.min_text_mass * k * k:
            return []
        return [blob for blob, _ in members]

    def _split_by_color(self, rows: slice, cols: slice, mask: np.ndarray, px: _Pixels) -> list[_Blob]:
        """The component as one blob of its main ink, or, when a second ink holds a real share of it,
        the connected pieces of each such ink."""
        ink = px.ink[rows, cols]
        votes = np.bincount(ink[mask], weights=px.alpha[rows, cols][mask], minlength=len(INKS))
        order = np.argsort(votes)[::-1]
        if votes[order[1]] < self.config.split_fraction * votes.sum():
            return [_Blob(rows, cols, mask, int(order[0]))]
        out = []
        for ink_index in order[: int((votes >= self.config.split_fraction * votes.sum()).sum())]:
            lab, _ = ndimage.label(mask & (ink == ink_index), structure=EIGHT_CONNECTED)
            for i, (r, c) in enumerate(ndimage.find_objects(lab), start=1):
                piece_rows = slice(rows.start + r.start, rows.start + r.stop)
                piece_cols = slice(cols.start + c.start, cols.start + c.stop)
                out.append(_Blob(piece_rows, piece_cols, lab[r, c] == i, int(ink_index)))
        return out

    def _soft_alpha(
        self, rows: slice, cols: slice, mask: np.ndarray, occupied: np.ndarray, diff: np.ndarray, direction: np.ndarray
    ) -> tuple[np.ndarray, tuple[slice, slice]]:
        """Coverage of one ink over a blob (mask over its tight window rows, cols) and its 1-px rim,
        excluding other blobs, in the window padded by 2 px; and that padded window."""
        S = occupied.shape[0]
        r = slice(max(rows.start - 2, 0), min(rows.stop + 2, S))
        c = slice(max(cols.start - 2, 0), min(cols.stop + 2, S))
        m = _paste(mask, rows, cols, (r, c))
        support = _dilate8(m) & ~(occupied[r, c] & ~m)
        a = np.clip(diff[r, c] @ direction / float(direction @ direction), 0.0, 1.0) * support
        return a, (r, c)

    def _fit_shape(self, soft: np.ndarray, window: tuple[slice, slice], mass: float, color: str) -> tuple[ShapeObject, float]:
        """The best of the six shapes (each at the best blur level) placed by the blob's mass and centroid,
        and its mean absolute error per unit of ink."""
        r, c = window
        h, w = soft.shape
        cy0 = float((soft * (np.arange(h, dtype=np.float32)[:, None] + 0.5)).sum() / mass) + r.start
        cx0 = float((soft * (np.arange(w, dtype=np.float32)[None, :] + 0.5)).sum() / mass) + c.start
        sizes = [float(np.sqrt(mass / AREA_FRACTION[shape])) for shape in SHAPES]
        cys = [cy0 - CENTROID_DROP.get(shape, 0.0) * size for shape, size in zip(SHAPES, sizes)]
        templates = _shape_templates(cx0, cys, sizes, c.start, r.start, w, h)
        blurred = _blur_matrices(h)[:, None] @ templates[None] @ _blur_matrices(w)[:, None]  # (levels, shapes, h, w)
        errors = np.abs(soft - blurred).sum(axis=(2, 3)).T / mass  # (shapes, levels)
        best = int(errors.argmin(axis=None) // errors.shape[1])  # the first minimum, in shape order
        return ShapeObject(SHAPES[best], color, cx0, cys[best], sizes[best]), float(errors.min())

    def _read_text(self, text_blobs: list[_Blob], occupied: np.ndarray, px: _Pixels, S: int) -> TextObject | None:
        rows = slice(min(b.rows.start for b in text_blobs), max(b.rows.stop for b in text_blobs))
        cols = slice(min(b.cols.start for b in text_blobs), max(b.cols.stop for b in text_blobs))
        union = np.logical_or.reduce([_paste(b.mask, b.rows, b.cols, (rows, cols)) for b in text_blobs])
        ink_index = text_blobs[0].ink  # the word's pieces share their ink
        soft, (r, c) = self._soft_alpha(rows, cols, union, occupied, px.diff, px.directions[ink_index])
        reading = read_word(soft, S)
        if reading is None:
            return None
        x0, y0 = c.start + reading.left, r.start + reading.top
        x1, y1 = c.start + reading.right, r.start + reading.bottom
        return TextObject(
            word=reading.word,
            color=INKS[ink_index],
            cx=(x0 + x1) / 2,
            cy=(y0 + y1) / 2,
            cap_height=reading.cap_height,
            width=x1 - x0,
            height=y1 - y0,
        )
