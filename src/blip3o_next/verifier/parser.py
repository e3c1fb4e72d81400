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
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..shapeworld.render import shape_coverage
from ..shapeworld.world import BACKGROUNDS, COLORS, SHAPES, TEXT_INK, Scene, ShapeObject, TextObject, scale
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


def _extent(mask: np.ndarray, axis: int) -> tuple[int, int]:
    """First and one-past-last row (axis=1) or column (axis=0) holding a pixel of the mask."""
    idx = np.nonzero(mask.any(axis=axis))[0]
    return int(idx[0]), int(idx[-1]) + 1


def _to_float_batch(images: np.ndarray | list[np.ndarray]) -> np.ndarray:
    batch = np.asarray(images)
    if batch.ndim == 3:
        batch = batch[None]
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.shape[1] != batch.shape[2]:
        raise ValueError(f"expected square RGB images shaped (N, S, S, 3), got {batch.shape}")
    return batch.astype(np.float32)


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
        ink, alpha = self._classify_pixels(diff, directions)
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
            self._parse_image(batch[n], diff[n], directions[n], labels[n], ink[n], alpha[n], per_image[n], slices, BACKGROUND_NAMES[bg_names[n]])
            for n in range(N)
        ]

    def _classify_pixels(self, diff: np.ndarray, directions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per pixel, the ink that best explains it as background + alpha * (ink - background), and that alpha.

        Only pixels visibly off the background are examined; the rest get alpha 0.
        """
        cfg = self.config
        norm2 = (directions**2).sum(-1)  # (N, K)
        valid = norm2 >= cfg.min_ink_distance**2
        d2 = (diff**2).sum(-1)  # (N, S, S)
        n, y, x = np.nonzero(d2 >= (0.25 * cfg.min_ink_distance) ** 2)
        px = diff[n, y, x]  # (P, 3)
        proj = np.einsum("pc,pkc->pk", px, directions[n])  # (P, K)
        a = np.clip(proj / np.maximum(norm2[n], 1.0), 0.0, 1.0)
        residual = d2[n, y, x][:, None] - 2 * a * proj + a * a * norm2[n]
        residual = np.where(valid[n], residual, np.inf)
        best = residual.argmin(-1)
        ink = np.zeros(d2.shape, np.int64)
        alpha = np.zeros(d2.shape, np.float32)
        ink[n, y, x] = best
        alpha[n, y, x] = a[np.arange(len(best)), best]
        return ink, alpha

    # ------------------------------------------------------------------ per image

    def _parse_image(self, image, diff, directions, labels, ink, alpha, labs, slices, background) -> Scene:
        cfg = self.config
        S = image.shape[0]
        k = scale(S)
        blobs = []  # (mask, ink index)
        for lab in labs:
            sl = slices[lab - 1][1:]
            mask = np.zeros(labels.shape, bool)
            mask[sl] = labels[sl] == lab
            blobs.extend(self._split_by_color(mask, ink, alpha, sl))
        occupied = np.zeros(labels.shape, bool)
        for mask, _ in blobs:
            occupied |= mask
        objects: list[ShapeObject] = []
        text_candidates: list[tuple[np.ndarray, int, float]] = []  # (mask, ink, mass)
        for mask, ink_index in blobs:
            soft, window, _ = self._soft_alpha(mask, occupied, diff, directions[ink_index])
            peak = float(alpha[mask].max())
            if peak < cfg.alpha_threshold:
                continue
            mass = float(soft.sum())
            color = INKS[ink_index]
            if color in TEXT_INK or mass < cfg.min_object_mass * k * k or peak < cfg.min_shape_peak:
                text_candidates.append((mask, ink_index, mass))  # letters, fragments of letters, or specks
                continue
            obj, err = self._fit_shape(soft, window, mass, color)
            height = (window[0].stop - window[0].start - 4) / k
            if err > cfg.text_fit_error and height <= cfg.max_text_height:
                text_candidates.append((mask, ink_index, mass))
            else:
                objects.append(obj)
        text_masks = self._group_text(text_candidates, S)
        text = self._read_text(text_masks, occupied, diff, directions, S) if text_masks else None
        objects.sort(key=lambda o: (o.cx, o.cy))
        return Scene(canvas=S, background=background, objects=tuple(objects), text=text)

    def _group_text(self, candidates: list[tuple[np.ndarray, int, float]], S: int) -> list[tuple[np.ndarray, int]]:
        """The word's pieces: candidates of the dominant ink in the row band of its largest piece.

        Returns nothing when they are too small or too short to be a word (specks)."""
        cfg = self.config
        k = scale(S)
        if not candidates:
            return []
        totals = np.zeros(len(INKS))
        for _, ink_index, mass in candidates:
            totals[ink_index] += mass
        ink_index = int(totals.argmax())
        pieces = [(m, mass) for m, i, mass in candidates if i == ink_index]
        pieces.sort(key=lambda p: -p[1])
        anchor = pieces[0][0]
        if _extent(anchor, axis=1)[1] - _extent(anchor, axis=1)[0] < cfg.min_text_height * k:
            return []  # even blurred, a word keeps at least one letter-sized piece
        reach = cfg.max_text_height * k / 2
        members = [pieces[0]]
        top, bottom = _extent(anchor, axis=1)
        left, right = _extent(anchor, axis=0)
        rest = pieces[1:]
        grew = True
        while grew:  # grow the word from its anchor by pieces within reach, until none is left in reach
            grew = False
            for i in reversed(range(len(rest))):
                t, b = _extent(rest[i][0], axis=1)
                l, r = _extent(rest[i][0], axis=0)
                if b > top - reach and t < bottom + reach and l < right + reach and r > left - reach:
                    members.append(rest.pop(i))
                    top, bottom, left, right = min(top, t), max(bottom, b), min(left, l), max(right, r)
                    grew = True
        if sum(ms for _, ms in members) < cfg.min_text_mass * k * k:
            return []
        return [(m, ink_index) for m, _ in members]

    def _split_by_color(self, mask: np.ndarray, ink: np.ndarray, alpha: np.ndarray, sl) -> list[tuple[np.ndarray, int]]:
        votes = np.bincount(ink[mask], weights=alpha[mask], minlength=len(INKS))
        order = np.argsort(votes)[::-1]
        if votes[order[1]] < self.config.split_fraction * votes.sum():
            return [(mask, int(order[0]))]
        out = []
        for ink_index in order[: int((votes >= self.config.split_fraction * votes.sum()).sum())]:
            part = mask & (ink == ink_index)
            lab, n = ndimage.label(part[sl], structure=EIGHT_CONNECTED)
            for i in range(1, n + 1):
                m = np.zeros(mask.shape, bool)
                m[sl] = lab == i
                out.append((m, int(ink_index)))
        return out

    def _soft_alpha(self, mask, occupied, diff, direction) -> tuple[np.ndarray, tuple[slice, slice], int]:
        """Coverage of one ink over the blob and its 1-px rim (excluding other blobs) in a padded window,
        the window, and the blob's height in px."""
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        S = mask.shape[0]
        r = slice(max(rows[0] - 2, 0), min(rows[-1] + 3, S))
        c = slice(max(cols[0] - 2, 0), min(cols[-1] + 3, S))
        m = mask[r, c]
        support = ndimage.binary_dilation(m, EIGHT_CONNECTED) & ~(occupied[r, c] & ~m)
        a = np.clip(diff[r, c] @ direction / float(direction @ direction), 0.0, 1.0) * support
        return a, (r, c), int(rows[-1] + 1 - rows[0])

    def _fit_shape(self, soft, window, mass, color) -> tuple[ShapeObject, float]:
        """The best of the six shapes (each at the best blur level) placed by the blob's mass and centroid,
        and its mean absolute error per unit of ink."""
        r, c = window
        h, w = soft.shape
        ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
        cy0 = float((soft * (ys + 0.5)).sum() / mass) + r.start
        cx0 = float((soft * (xs + 0.5)).sum() / mass) + c.start
        best, best_err = None, np.inf
        for shape in SHAPES:
            size = float(np.sqrt(mass / AREA_FRACTION[shape]))
            cy = cy0 - CENTROID_DROP.get(shape, 0.0) * size
            template = shape_coverage(shape, cx0, cy, size, c.start, r.start, w, h, supersample=FIT_SUPERSAMPLE)
            for sigma in BLUR_LEVELS:
                blurred = ndimage.gaussian_filter(template, sigma, mode="constant") if sigma else template
                err = float(np.abs(soft - blurred).sum() / mass)
                if err < best_err:
                    best, best_err = ShapeObject(shape, color, cx0, cy, size), err
        return best, best_err

    def _read_text(self, text_masks, occupied, diff, directions, S) -> TextObject | None:
        votes = np.zeros(len(INKS))
        union = np.zeros(occupied.shape, bool)
        for mask, ink_index in text_masks:
            votes[ink_index] += mask.sum()
            union |= mask
        ink_index = int(votes.argmax())
        soft, (r, c), _ = self._soft_alpha(union, occupied, diff, directions[ink_index])
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
