"""The training data stream: one global stream indexed by sample position (the data engine's, or with `data:` your
own shards', `own_data.py`). Every step takes the next `batch_size` samples and each process its contiguous slice,
so a run with N processes sees exactly the batches of a single-process run; each sample's noise is keyed by its
position."""

from __future__ import annotations

import math
from itertools import islice
from typing import TYPE_CHECKING

import numpy as np
import torch

from .config import TrainConfig

if TYPE_CHECKING:
    from .own_data import OwnData


def process_batch(cfg: TrainConfig, position: int, rank: int, world: int, own: OwnData | None = None) -> list[dict]:
    """This process's contiguous slice of the global batch starting at `position` in the sample stream: the data
    engine's, or `own` data's (`cfg.data`), which is indexed by position the same way.

    Each sample carries its stream index, which keys its training noise (see `sample_generators`).
    """
    from ..shapeworld.dataset import t2i_samples

    per_rank = cfg.batch_size // world
    start = position + rank * per_rank
    if own is not None:
        return [{**own.sample(index, cfg.seed), "index": index} for index in range(start, start + per_rank)]
    if cfg.stage == "edit_sft":
        return [mixed_sample(cfg, index) for index in range(start, start + per_rank)]
    stream = t2i_samples(cfg.seed, cfg.canvas, cfg.category_weights, cfg.paraphrase_probability, start=start)
    return [{**s, "index": start + i} for i, s in enumerate(islice(stream, per_rank))]


def open_own_data(cfg: TrainConfig) -> OwnData | None:
    """The shards `cfg.data` names (None without); edit pairs count only for edit_sft."""
    from .own_data import OwnData

    return OwnData(cfg.data, cfg.canvas, edits=cfg.stage == "edit_sft") if cfg.data else None


def is_edit_position(index: int, edit_fraction: float) -> bool:
    """Spreads edits evenly over the stream (0.75: three of every four positions), so every batch slice mixes both."""
    return math.floor((index + 1) * edit_fraction) > math.floor(index * edit_fraction)


def mixed_sample(cfg: TrainConfig, index: int) -> dict:
    """Sample `index` of the edit SFT stream: an edit pair (source as "reference", target as "image" and its scene as
    "scene", the instruction as "caption") or a t2i sample, each drawn from its own seeded stream at that position."""
    from ..shapeworld.dataset import edit_samples, t2i_samples

    if is_edit_position(index, cfg.edit_fraction):
        s = next(edit_samples(cfg.seed, cfg.canvas, cfg.edit_category_weights, cfg.paraphrase_probability, start=index, placement=cfg.edit_placement))
        return {**s, "image": s["target"], "scene": s["target_scene"], "reference": s["source"], "caption": s["instruction"],
                "prompt": s["instruction"], "index": index}
    return {**next(t2i_samples(cfg.seed, cfg.canvas, cfg.category_weights, cfg.paraphrase_probability, start=index)), "index": index}


def sample_generators(cfg: TrainConfig, samples: list[dict]) -> list[torch.Generator]:
    """One generator per sample, seeded by (seed, stream index): noise and condition dropout then depend on
    neither the process count nor the resume point."""
    seeds = [int(np.random.SeedSequence([cfg.seed, 1, s["index"]]).generate_state(1)[0]) for s in samples]
    return [torch.Generator().manual_seed(seed) for seed in seeds]
