"""Reading user files with one-line errors, and writing outputs atomically (temporary file, then rename)."""

from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from PIL import Image

MAX_IMAGE_SIDE = 4096  # px; larger inputs are refused before they are decoded


class InputError(ValueError):
    """A problem with the user's input; the CLI prints it as one line and exits non-zero."""


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        a = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        return Image.fromarray(np.clip(np.rint(a * 255.0 / peak), 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "F":
        return Image.fromarray(np.clip(np.rint(np.asarray(im)), 0, 255).astype(np.uint8), "L").convert("RGB")
    if (im.mode == "P" and "transparency" in im.info) or im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str | os.PathLike, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """Load an image as an (H, W, 3) uint8 array, converting convertible modes; raise InputError otherwise."""
    return _read_image(Path(path), str(path), max_side)


def decode_image(data: bytes, name: str, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """An image file's bytes (e.g. a member of a tar shard) as load_image reads a file; errors name `name`."""
    return _read_image(io.BytesIO(data), name, max_side)


def _read_image(source: Path | io.BytesIO, name: str, max_side: int) -> np.ndarray:
    """Decode `source` fully (a truncated or corrupt file fails here, not later) and convert it to RGB."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as im:
                w, h = im.size
                if max(w, h) > max_side:
                    raise InputError(f"{name}: image is {w}x{h}, larger than the {max_side} px limit")
                im.load()
                return np.asarray(to_rgb(im))
    except InputError:
        raise
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name}: is a directory, not an image") from None
    except Image.DecompressionBombError:
        raise InputError(f"{name}: image is too large to decode safely") from None
    except (OSError, ValueError, SyntaxError) as e:  # unidentified, truncated or corrupt files
        reason = str(e).split("\n")[0] or type(e).__name__
        raise InputError(f"{name}: not a readable image ({reason})") from None


def load_square_image(path: str | os.PathLike) -> np.ndarray:
    img = load_image(path)
    if img.shape[0] != img.shape[1]:
        raise InputError(f"{path}: image is {img.shape[1]}x{img.shape[0]}; ShapeWorld images are square")
    return img


def read_jsonl(path: str | os.PathLike, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Read a JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    records = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
        missing = [k for k in required if k not in record]
        if missing:
            raise InputError(f"{path}:{lineno}: missing field {missing[0]!r}")
        records.append(record)
    if not records:
        raise InputError(f"{path}: no records")
    return records


def _new_file_mode() -> int:
    """0666 minus the process umask: the mode open() would give a new file (reading the umask means setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it into place, on failure remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, _new_file_mode())  # mkstemp makes 0600; the result should read like any file the user creates
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def save_png(path: str | os.PathLike, image: np.ndarray | Image.Image) -> None:
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8), "RGB")
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")


def check_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` if needed and make sure files can be written there (fail before any work is done)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise InputError(f"{path}: cannot write there ({e.strerror or e})") from None
    return path
