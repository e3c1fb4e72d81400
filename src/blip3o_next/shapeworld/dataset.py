"""Training data from the ShapeWorld engine: seeded infinite sample streams, a torch IterableDataset over them,
and WebDataset tar shards (png + json) for users who want files.

Sample i of a stream draws only from its own Generator, seeded with the fixed-length key
[seed, kind, rank, worker, i]. So a seed fixes every sample, no two streams share draws, and
skipping ahead to resume costs nothing (no earlier sample is generated).

    >>> sample = next(t2i_samples(seed=0))
    >>> sample["image"].shape, sample["category"] in CATEGORIES
    ((64, 64, 3), True)
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import uuid
from itertools import count, islice
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from tqdm.auto import tqdm

from .edits import EDIT_CATEGORIES, sample_edit
from .prompts import CATEGORIES, Prompt, canonical_prompt, captions
from .render import render
from .sampler import PlacementError, sample_scene_for
from .world import Scene, check_canvas

logger = logging.getLogger(__name__)

Sample = dict[str, Any]
StreamId = tuple[int, int]  # (distributed rank, dataloader worker)

KINDS = ("t2i", "edit")
# Dense prompts combine every other skill, so they get a larger share by default.
DEFAULT_T2I_WEIGHTS = MappingProxyType({c: 1.5 if c == "dense" else 1.0 for c in CATEGORIES})
DEFAULT_EDIT_WEIGHTS = MappingProxyType({c: 1.0 for c in EDIT_CATEGORIES})
N_CAPTIONS = 4  # captions(...) returns the canonical text plus up to N_CAPTIONS - 1 paraphrases
PROMPT_ATTEMPTS = 20  # fresh prompts of the drawn category tried before a t2i sample fails (dense can overfill S=32)
# Sample fields stored as PNG entries of a shard (field -> tar entry suffix); everything else goes to the json entry.
IMAGE_ENTRIES = MappingProxyType({"image": "png", "source": "source.png", "target": "target.png"})
KEY_DIGITS = 9  # zero padding of the sample index in __key__
SHARD_MTIME = 0  # fixed tar member timestamps, so one seed gives byte-identical shards


# ----------------------------------------------------------------------------- argument checks


def _check_stream_args(seed: int, canvas: int, paraphrase_probability: float, stream: StreamId, start: int) -> None:
    """Reject bad arguments when the stream is created, not at its first sample (possibly inside a worker)."""
    check_canvas(canvas)
    if not all(isinstance(v, (int, np.integer)) and v >= 0 for v in (seed, *stream, start)) or len(stream) != 2:
        raise ValueError(f"seed, start and the two stream ids must be non-negative ints, got {seed=}, {stream=}, {start=}")
    if not 0.0 <= paraphrase_probability <= 1.0:
        raise ValueError(f"paraphrase_probability must be in [0, 1], got {paraphrase_probability}")


def _category_distribution(
    weights: Mapping[str, float] | None, default: Mapping[str, float], allowed: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """Categories with a positive weight and their probabilities, in `allowed` order (dict order must not matter)."""
    weights = default if weights is None else weights
    unknown = sorted(set(weights) - set(allowed))
    if unknown:
        raise ValueError(f"unknown categories {unknown}; choose from {', '.join(allowed)}")
    if any(w < 0 for w in weights.values()):
        raise ValueError(f"category weights must be non-negative, got {dict(weights)}")
    names = [c for c in allowed if weights.get(c, 0) > 0]
    if not names:
        raise ValueError("category_weights must give at least one category a positive weight")
    p = np.array([weights[c] for c in names], dtype=np.float64)
    return names, p / p.sum()


# ----------------------------------------------------------------------------- one sample


def _sample_rng(seed: int, kind: str, stream: StreamId, index: int) -> np.random.Generator:
    """The Generator of one sample. The key has a fixed length because SeedSequence([a]) equals SeedSequence([a, 0])."""
    return np.random.default_rng([seed, KINDS.index(kind), *stream, index])


def _json_ready(meta: dict[str, Any]) -> dict[str, Any]:
    """Metadata exactly as a JSON shard reads it back (tuples become lists), so streams and shards compare equal."""
    return json.loads(json.dumps(meta))


def _prompt_and_scene(category: str, rng: np.random.Generator, canvas: int) -> tuple[Prompt, Scene]:
    """A canonical prompt of `category` and a scene for it; a prompt that cannot be placed is redrawn."""
    for _ in range(PROMPT_ATTEMPTS):
        prompt = canonical_prompt(category, rng)
        try:
            return prompt, sample_scene_for(prompt.requirement, rng, canvas)
        except PlacementError:
            logger.debug("no %dpx scene for %r; drawing another %s prompt", canvas, prompt.text, category)
    raise PlacementError(f"no {category} prompt could be placed on a {canvas}px canvas in {PROMPT_ATTEMPTS} attempts")


def _t2i_sample(rng: np.random.Generator, canvas: int, names: list[str], p: np.ndarray, paraphrase_probability: float) -> Sample:
    """One text-to-image sample; the caption is drawn after the scene so it may name the scene's background."""
    category = str(rng.choice(names, p=p))
    prompt, scene = _prompt_and_scene(category, rng, canvas)
    paraphrases = captions(prompt.requirement, scene, rng, N_CAPTIONS)[1:] if rng.random() < paraphrase_probability else []
    caption = str(rng.choice(paraphrases)) if paraphrases else prompt.text
    meta = {
        "caption": caption,
        "prompt": prompt.text,
        "category": category,
        "requirement": prompt.requirement.to_dict(),
        "scene": scene.to_dict(),
    }
    return {"image": render(scene), **_json_ready(meta)}


def _edit_sample(rng: np.random.Generator, canvas: int, names: list[str], p: np.ndarray, paraphrase_probability: float, placement: str) -> Sample:
    """One edit sample, rendered on both sides so a trainer needs no renderer."""
    category = str(rng.choice(names, p=p))
    pair = sample_edit(category, rng, canvas, paraphrase=bool(rng.random() < paraphrase_probability), placement=placement)
    return {"source": render(pair.source), "target": render(pair.target), **_json_ready(pair.to_dict())}


# ----------------------------------------------------------------------------- streams


def t2i_samples(
    seed: int,
    canvas: int = 64,
    category_weights: Mapping[str, float] | None = None,
    paraphrase_probability: float = 0.5,
    *,
    stream: StreamId = (0, 0),
    start: int = 0,
) -> Iterator[Sample]:
    """Infinite text-to-image samples.

    Each is {"image": (S, S, 3) uint8, "caption", "prompt" (canonical text), "category", "requirement", "scene"}.
    The caption is the canonical prompt, or with `paraphrase_probability` one of its paraphrases.
    `category_weights` maps categories to relative weights (missing ones get 0; default DEFAULT_T2I_WEIGHTS).
    `stream` names an independent sub-stream (ShapeWorldStream passes (rank, worker)); `start` skips that many samples.
    """
    _check_stream_args(seed, canvas, paraphrase_probability, stream, start)
    names, p = _category_distribution(category_weights, DEFAULT_T2I_WEIGHTS, CATEGORIES)
    return (_t2i_sample(_sample_rng(seed, "t2i", stream, i), canvas, names, p, paraphrase_probability) for i in count(start))


def edit_samples(
    seed: int,
    canvas: int = 64,
    category_weights: Mapping[str, float] | None = None,
    paraphrase_probability: float = 0.5,
    *,
    stream: StreamId = (0, 0),
    start: int = 0,
    placement: str = "uniform",
) -> Iterator[Sample]:
    """Infinite edit samples.

    Each is {"source", "target": (S, S, 3) uint8, "instruction", "category", "spec", "source_scene", "target_scene"}.
    The instruction is canonical, or with `paraphrase_probability` a paraphrase. Other arguments as in t2i_samples
    (default weights DEFAULT_EDIT_WEIGHTS); `placement` as in `edits.sample_edit`.
    """
    _check_stream_args(seed, canvas, paraphrase_probability, stream, start)
    names, p = _category_distribution(category_weights, DEFAULT_EDIT_WEIGHTS, EDIT_CATEGORIES)
    return (_edit_sample(_sample_rng(seed, "edit", stream, i), canvas, names, p, paraphrase_probability, placement) for i in count(start))


def _samples_fn(kind: str) -> Callable[..., Iterator[Sample]]:
    """The stream function of a sample kind, so every entry point rejects an unknown kind the same way."""
    if kind == "t2i":
        return t2i_samples
    if kind == "edit":
        return edit_samples
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(KINDS)}")


def _rank_and_worker() -> StreamId:
    """Which stream this process reads: its distributed rank (0 without torch.distributed) and DataLoader worker id."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    info = torch.utils.data.get_worker_info()
    return (torch.distributed.get_rank() if distributed else 0, info.id if info is not None else 0)


class ShapeWorldStream(torch.utils.data.IterableDataset):
    """Infinite ShapeWorld samples for a DataLoader; every (rank, worker) pair reads its own stream.

    Stream (rank, worker) is t2i_samples / edit_samples with stream=(rank, worker), so a run is reproducible
    for a fixed world size and worker count, and a single-process stream equals t2i_samples(seed).
    `skip` drops that many samples at the start of every stream, to resume a trainer: a DataLoader with W
    workers takes samples round-robin, so after it delivered N samples each stream has produced N / W.

        loader = DataLoader(ShapeWorldStream("t2i", seed=0), batch_size=None, num_workers=2)
    """

    def __init__(
        self,
        kind: str = "t2i",
        seed: int = 0,
        canvas: int = 64,
        category_weights: Mapping[str, float] | None = None,
        paraphrase_probability: float = 0.5,
        skip: int = 0,
    ) -> None:
        super().__init__()
        self.kind = kind
        self.seed = seed
        self.canvas = canvas
        self.category_weights = dict(category_weights) if category_weights is not None else None
        self.paraphrase_probability = paraphrase_probability
        self.skip = skip
        self.samples((0, 0))  # builds (and discards) a stream so bad arguments raise here, not inside a worker

    def samples(self, stream: StreamId) -> Iterator[Sample]:
        """The samples of one (rank, worker) stream, after `skip`."""
        fn = _samples_fn(self.kind)
        return fn(self.seed, self.canvas, self.category_weights, self.paraphrase_probability, stream=stream, start=self.skip)

    def __iter__(self) -> Iterator[Sample]:
        return self.samples(_rank_and_worker())


# ----------------------------------------------------------------------------- WebDataset shards


def _png(image: np.ndarray) -> bytes:
    """Lossless, so a shard reads back the exact pixels of the stream."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    """A writable (H, W, 3) uint8 array, like the renderer returns."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"))


def _encode(index: int, sample: Sample) -> dict[str, Any]:
    """A shard record: every image field as a PNG entry, the rest as one JSON entry."""
    record: dict[str, Any] = {"__key__": f"{index:0{KEY_DIGITS}d}"}
    meta = {}
    for field, value in sample.items():
        if field in IMAGE_ENTRIES:
            record[IMAGE_ENTRIES[field]] = _png(value)
        else:
            meta[field] = value
    record["json"] = json.dumps(meta).encode("utf-8")
    return record


def _decode(record: Mapping[str, Any]) -> Sample:
    """The sample a record was made from (WebDataset's own keys such as __url__ are dropped)."""
    sample = {field: _unpng(record[entry]) for field, entry in IMAGE_ENTRIES.items() if entry in record}
    sample.update(json.loads(record["json"]))
    return sample


def _write_shards(directory: Path, kind: str, samples: Iterable[Sample], n: int, shard_size: int, progress: bool) -> None:
    """Every sample into numbered shards of at most `shard_size` records, with fixed timestamps for reproducibility."""
    pattern = str(directory / f"shapeworld-{kind}-%06d.tar")
    bar = tqdm(samples, total=n, disable=not progress, desc=f"shapeworld {kind} shards", unit="sample")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0, encoder=False, mtime=SHARD_MTIME) as sink:
        for index, sample in enumerate(bar):
            sink.write(_encode(index, sample))


def export_shards(
    out_dir: str | os.PathLike,
    kind: str,
    n: int,
    seed: int = 0,
    canvas: int = 64,
    shard_size: int = 1000,
    progress: bool = True,
    *,
    category_weights: Mapping[str, float] | None = None,
    paraphrase_probability: float = 0.5,
) -> list[Path]:
    """Write the first `n` samples of the `kind` stream for `seed` as out_dir/shapeworld-{kind}-NNNNNN.tar.

    Records hold `png` (t2i) or `source.png` + `target.png` (edit), and `json` with the other fields; read them
    back with read_shards. The shards are built in a hidden sibling directory that is renamed to `out_dir`
    only when complete, so an interrupted export leaves no partial `out_dir`. Returns the shard paths in order.
    """
    out_dir = Path(out_dir)
    if n < 1 or shard_size < 1:
        raise ValueError(f"n and shard_size must be positive, got {n=}, {shard_size=}")
    samples = _samples_fn(kind)(seed, canvas, category_weights, paraphrase_probability)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory; pick a new out_dir or remove it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:12]}"
    partial.mkdir()
    try:
        _write_shards(partial, kind, islice(samples, n), n, shard_size, progress)
        os.replace(partial, out_dir)  # atomic; replaces out_dir only if it is an empty directory
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    paths = sorted(out_dir.glob(f"shapeworld-{kind}-*.tar"))
    logger.info("wrote %d %s samples in %d shards to %s", n, kind, len(paths), out_dir)
    return paths


def read_shards(paths_or_pattern: str | os.PathLike | Sequence[str | os.PathLike]) -> Iterator[Sample]:
    """Samples from shards, in the format of t2i_samples / edit_samples (images decoded to uint8 arrays).

    Takes one path, a brace pattern ("dir/shapeworld-t2i-{000000..000003}.tar") or a list of paths, and reads every
    shard in the given order in the calling process (no splitting across ranks or DataLoader workers).
    """
    if isinstance(paths_or_pattern, (str, os.PathLike)):
        urls: str | list[str] = os.fspath(paths_or_pattern)
    else:
        urls = [os.fspath(p) for p in paths_or_pattern]
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=None, workersplitter=None)
    return (_decode(record) for record in dataset)
