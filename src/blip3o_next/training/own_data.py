"""Training on your own images: WebDataset tar shards in the layout img2dataset writes, read as a sample stream
indexed by position, like the data engine's (`shapeworld/dataset.py`), so the trainer's data position resumes exactly.

Layout: each record is the tar members `<key>.<ext>` of one key (webdataset groups them; extensions are lower-cased).

    text to image:  an image `jpg` / `jpeg` / `png` / `webp`, and its caption: `txt`, or `json` with a "caption" field
    edit pair:      `source.<image ext>` + `target.<image ext>`, and the instruction: `txt`, or `json` with "instruction"

(img2dataset writes `jpg` + `txt` + `json`; `blip3o data export` writes `png` or `source.png` + `target.png` with a
`json` caption or instruction, so its shards read as own data too, their scenes unread.) A `txt` that is empty falls
back to the `json` field. Edit pairs are read by the edit_sft stage only; there a shard may mix both kinds.

Images of any size and mode are converted to RGB (transparency over white, `fileio.to_rgb`), then center-cropped to a
square and resized to the canvas with Pillow (`ImageOps.fit`, bicubic); images larger than `fileio.MAX_IMAGE_SIDE`
are refused.

Order: epoch e visits the shards in a permutation drawn from (seed, e), and each shard's usable records in a
permutation drawn from (seed, e, shard); epochs follow each other forever. Sample i is thus a function of i, the seed
and the shards alone: a resumed run, and every DDP process reading its slice of a batch, find it without reading
what came before. To place positions, opening the data reads every shard once and counts its usable records; while
training, a process keeps one shard's undecoded records in memory.

Bad input: a pattern that matches no file, an unreadable tar, a shard with no usable record and an image that does not
decode are one-line InputErrors (a broken image stops the run: swapping in another sample would hide the fault). A
record without an image or without its text is skipped, and each shard's skips are logged once as a warning with
their counts.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image, ImageOps

from ..fileio import InputError, decode_image

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # the first one present is read
EDIT_PREFIXES = {"reference": "source.", "image": "target."}  # sample field -> member prefix of an edit pair
TEXT_FIELDS = {False: "caption", True: "instruction"}  # the json field of a t2i record / an edit pair

Layout = tuple[dict[str, str], str]  # (member name by sample field, the caption or instruction)


def expand_shards(pattern: str) -> list[str]:
    """The shard files `pattern` names: a folder (its *.tar files), a glob, or a brace pattern such as
    "data/{00000..00009}.tar" (webdataset's expansion; "::" joins several). Globs and folders are sorted, so the
    order (hence each sample's position) does not depend on the file system."""
    shards: list[str] = []
    for part in wds.shardlists.expand_urls(str(pattern)):
        found = sorted(str(p) for p in Path(part).glob("*.tar")) if os.path.isdir(part) else sorted(glob.glob(part))
        if not found:
            raise InputError(f"data: {part!r}{'' if part == pattern else f' (from {pattern!r})'} matches no shard file")
        shards += found
    return shards


def read_records(shard: str) -> list[dict[str, Any]]:
    """A shard's records (member name -> bytes, plus __key__) in file order, undecoded."""
    try:
        return list(wds.tarfile_samples([{"url": shard}]))
    except (tarfile.TarError, OSError, ValueError) as e:
        reason = str(e.args[0] if e.args else e).splitlines()[0] or type(e).__name__
        raise InputError(f"{shard}: not a readable tar shard ({reason})") from None


def layout(record: dict[str, Any], edits: bool) -> Layout | str:
    """Which members of a record hold its images and text, or why the record is skipped."""
    sides = {name: _image_member(record, prefix) for name, prefix in EDIT_PREFIXES.items()}
    is_edit = any(sides.values())
    if is_edit and not edits:
        return "edit pair outside edit_sft"
    if is_edit and not all(sides.values()):
        return "edit pair without both images"
    members = sides if is_edit else {"image": _image_member(record, "")}
    if not all(members.values()):
        return "no image"
    text = _text(record, TEXT_FIELDS[is_edit])
    return (members, text) if text else f"no {TEXT_FIELDS[is_edit]}"


def _image_member(record: dict[str, Any], prefix: str) -> str | None:
    return next((prefix + ext for ext in IMAGE_EXTENSIONS if prefix + ext in record), None)


def _text(record: dict[str, Any], field: str) -> str:
    """The `txt` member, else the json member's `field` ("" when neither holds text)."""
    text = record["txt"].decode("utf-8", errors="replace").strip() if "txt" in record else ""
    if text or "json" not in record:
        return text
    try:
        meta = json.loads(record["json"])
    except (ValueError, UnicodeDecodeError):
        return ""
    value = meta.get(field) if isinstance(meta, dict) else None
    return value.strip() if isinstance(value, str) else ""


def fit_to_canvas(image: np.ndarray, canvas: int) -> np.ndarray:
    """Center-crop to a square and resize to canvas x canvas (bicubic); an image of that size is returned as is."""
    if image.shape[:2] == (canvas, canvas):
        return image
    return np.asarray(ImageOps.fit(Image.fromarray(image), (canvas, canvas), Image.Resampling.BICUBIC))


class OwnData:
    """The samples of some shards as a stream indexed by position (see the module docstring for order and layout).

    `sample(i, seed)` is {"image": (canvas, canvas, 3) uint8, "caption", "prompt"} for a t2i record, and for an edit
    pair also "reference" (the source image; "image" is the target, "caption" and "prompt" the instruction): the
    fields the trainer's stages read from the data engine's samples, without a scene.

        data = OwnData("shards/{00000..00009}.tar", canvas=64)
        first = data.sample(0, seed=0)
    """

    def __init__(self, pattern: str, canvas: int, edits: bool = False):
        self.canvas, self.edits = canvas, edits
        self.shards = expand_shards(pattern)
        self.counts = np.array([self._count(shard) for shard in self.shards])
        self._open: tuple[int, list[tuple[dict[str, Any], Layout]]] | None = None  # the shard in memory
        logger.info("own data: %d usable samples in %d shards (%s)", len(self), len(self.shards), pattern)

    def __len__(self) -> int:
        """Usable samples per epoch."""
        return int(self.counts.sum())

    def _count(self, shard: str) -> int:
        """The shard's usable records; logs what it skips, and refuses a shard without any."""
        records = read_records(shard)
        skipped = Counter(found for found in (layout(r, self.edits) for r in records) if isinstance(found, str))
        usable = len(records) - sum(skipped.values())
        if not usable:
            kinds = "an image (jpg/png/webp) and a caption (txt, or json 'caption')" + (
                "; edit pairs: source.<ext>, target.<ext> and an instruction" if self.edits else "")
            found = f" ({', '.join(f'{n} {why}' for why, n in skipped.items())})" if skipped else ""
            raise InputError(f"{shard}: no usable sample in {len(records)} records{found}; each needs {kinds}")
        if skipped:
            logger.warning("%s: skipped %d of %d records: %s", shard, sum(skipped.values()), len(records),
                           ", ".join(f"{n} {why}" for why, n in skipped.items()))
        return usable

    def locate(self, index: int, seed: int) -> tuple[int, int]:
        """(shard, slot among its usable records in file order) of stream position `index`."""
        epoch, offset = divmod(index, len(self))
        order = np.random.default_rng([seed, 0, epoch, 0]).permutation(len(self.shards))  # fixed-length keys
        ends = np.cumsum(self.counts[order])
        turn = int(np.searchsorted(ends, offset, side="right"))
        shard = int(order[turn])
        within = offset - (ends[turn] - self.counts[shard])
        return shard, int(np.random.default_rng([seed, 1, epoch, shard]).permutation(self.counts[shard])[within])

    def _usable(self, shard: int) -> list[tuple[dict[str, Any], Layout]]:
        """The shard's usable records with their layouts, read once while consecutive positions stay in it."""
        if self._open is None or self._open[0] != shard:
            found = ((r, layout(r, self.edits)) for r in read_records(self.shards[shard]))
            self._open = (shard, [(r, lay) for r, lay in found if not isinstance(lay, str)])
        return self._open[1]

    def sample(self, index: int, seed: int) -> dict[str, Any]:
        """Stream position `index` for `seed`, decoded and fitted to the canvas."""
        shard, slot = self.locate(index, seed)
        record, (members, text) = self._usable(shard)[slot]
        name = f"{self.shards[shard]}: sample {record['__key__']}"
        images = {f: fit_to_canvas(decode_image(record[m], f"{name}: {m}"), self.canvas) for f, m in members.items()}
        return {**images, "caption": text, "prompt": text}
