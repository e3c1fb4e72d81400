"""Image degradations that mimic what generated images look like, for testing the verifier
(and for augmentation). Each takes and returns an (S, S, 3) uint8 array; random ones take a Generator."""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image
from scipy import ndimage


def gaussian_blur(img: np.ndarray, sigma: float = 0.8) -> np.ndarray:
    out = ndimage.gaussian_filter(img.astype(np.float32), sigma=(sigma, sigma, 0), mode="nearest")
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def gaussian_noise(img: np.ndarray, rng: np.random.Generator, sigma: float = 6.0) -> np.ndarray:
    return np.clip(np.rint(img + rng.normal(0.0, sigma, img.shape)), 0, 255).astype(np.uint8)


def jpeg(img: np.ndarray, quality: int = 75) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def color_drift(img: np.ndarray, rng: np.random.Generator, amount: float = 15.0) -> np.ndarray:
    """Shift each channel of the whole image by one offset drawn from [-amount, amount]."""
    shift = rng.uniform(-amount, amount, size=3)
    return np.clip(np.rint(img + shift), 0, 255).astype(np.uint8)


def specks(img: np.ndarray, rng: np.random.Generator, count: int = 4, max_size: int = 2) -> np.ndarray:
    """Sprinkle `count` small squares (1..max_size px at S=64, scaled) of random colors."""
    out = img.copy()
    S = img.shape[0]
    for _ in range(count):
        side = max(1, int(round(rng.integers(1, max_size + 1) * S / 64)))
        y, x = rng.integers(0, S - side + 1, size=2)
        out[y : y + side, x : x + side] = rng.integers(0, 256, size=3)
    return out


@dataclass(frozen=True)
class Degradation:
    name: str
    apply: Callable[[np.ndarray, np.random.Generator], np.ndarray]


def _combined(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return jpeg(gaussian_noise(color_drift(gaussian_blur(img), rng), rng))


# The suite named by the verifier's acceptance criteria (blur sigma 0.8 px, noise sigma 6, JPEG 75, drift +-15).
DEGRADATIONS: dict[str, Degradation] = {
    d.name: d
    for d in (
        Degradation("clean", lambda img, rng: img),
        Degradation("blur", lambda img, rng: gaussian_blur(img, 0.8)),
        Degradation("noise", lambda img, rng: gaussian_noise(img, rng, 6.0)),
        Degradation("jpeg", lambda img, rng: jpeg(img, 75)),
        Degradation("drift", lambda img, rng: color_drift(img, rng, 15.0)),
        Degradation("combined", _combined),
        Degradation("specks", lambda img, rng: specks(img, rng)),
    )
}
