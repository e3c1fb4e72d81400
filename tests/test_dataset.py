"""The data engine's streams, DataLoader dataset and WebDataset shards: determinism, coverage and round trips."""

from __future__ import annotations

from itertools import count, islice

import numpy as np
import pytest
import torch

from blip3o_next.shapeworld import dataset
from blip3o_next.shapeworld.dataset import ShapeWorldStream, edit_samples, export_shards, read_shards, t2i_samples
from blip3o_next.shapeworld.edits import EDIT_CATEGORIES
from blip3o_next.shapeworld.prompts import CATEGORIES
from blip3o_next.shapeworld.world import Scene


def take(iterator, n: int) -> list[dict]:
    return list(islice(iterator, n))


def assert_samples_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], np.ndarray):
                assert x[key].dtype == y[key].dtype == np.uint8 and np.array_equal(x[key], y[key]), key
            else:
                assert x[key] == y[key], key


def fingerprint(sample: dict) -> tuple:
    """Identifies a sample by its text and image bytes (DataLoader turns arrays into tensors)."""
    image = sample.get("image", sample.get("source"))
    return sample.get("caption", sample.get("instruction")), np.asarray(image).tobytes()


@pytest.mark.parametrize("samples", [t2i_samples, edit_samples])
def test_same_seed_same_samples_and_different_seeds_differ(samples):
    assert_samples_equal(take(samples(3), 12), take(samples(3), 12))
    assert [fingerprint(s) for s in take(samples(3), 12)] != [fingerprint(s) for s in take(samples(4), 12)]


def test_t2i_samples_format_captions_and_category_coverage():
    samples = take(t2i_samples(0), 300)
    s = samples[0]
    assert set(s) == {"image", "caption", "prompt", "category", "requirement", "scene"}
    assert s["image"].shape == (64, 64, 3) and s["image"].dtype == np.uint8
    assert Scene.from_dict(s["scene"]).canvas == 64
    assert {x["category"] for x in samples} == set(CATEGORIES)
    assert len({x["caption"] for x in samples}) > 250
    paraphrased = sum(x["caption"] != x["prompt"] for x in samples)
    assert 0.3 * len(samples) < paraphrased < 0.7 * len(samples)  # paraphrase_probability = 0.5


def test_t2i_caption_is_the_prompt_without_paraphrases_and_weights_select_categories():
    samples = take(t2i_samples(1, category_weights={"text": 1.0, "counting": 2.0}, paraphrase_probability=0.0), 30)
    assert all(x["caption"] == x["prompt"] for x in samples)
    assert {x["category"] for x in samples} == {"text", "counting"}


def test_edit_samples_change_the_image_except_keep():
    samples = take(edit_samples(0), 150)
    assert {x["category"] for x in samples} == set(EDIT_CATEGORIES)
    for x in samples:
        assert set(x) == {"source", "target", "instruction", "category", "spec", "source_scene", "target_scene"}
        same = np.array_equal(x["source"], x["target"])
        assert same == (x["category"] == "keep"), x["instruction"]


def test_bad_arguments_raise_early():
    with pytest.raises(ValueError, match="unknown categories"):
        t2i_samples(0, category_weights={"nope": 1.0})
    with pytest.raises(ValueError, match="paraphrase_probability"):
        edit_samples(0, paraphrase_probability=2.0)
    with pytest.raises(ValueError, match="unknown kind"):
        ShapeWorldStream("video")


def test_stream_workers_are_distinct_and_reproducible():
    def run() -> list[dict]:
        loader = torch.utils.data.DataLoader(ShapeWorldStream("t2i", seed=5), batch_size=None, num_workers=2)
        return take(iter(loader), 40)

    first, second = run(), run()
    prints = [fingerprint(s) for s in first]
    assert len(set(prints)) == len(prints)
    assert prints == [fingerprint(s) for s in second]
    # Workers alternate, and worker w reads stream (rank 0, worker w).
    worker1 = take(ShapeWorldStream("t2i", seed=5).samples((0, 1)), 20)
    assert prints[1::2] == [fingerprint(s) for s in worker1]


def test_single_process_stream_equals_the_generator_and_skip_resumes():
    assert_samples_equal(take(iter(ShapeWorldStream("edit", seed=2)), 5), take(edit_samples(2), 5))
    full = take(iter(ShapeWorldStream("t2i", seed=2)), 10)
    assert_samples_equal(take(iter(ShapeWorldStream("t2i", seed=2, skip=6)), 4), full[6:])


@pytest.mark.parametrize("kind, samples", [("t2i", t2i_samples), ("edit", edit_samples)])
def test_export_read_round_trip(tmp_path, kind, samples):
    out = tmp_path / "shards"
    paths = export_shards(out, kind, n=7, seed=9, shard_size=3, progress=False)
    assert [p.name for p in paths] == [f"shapeworld-{kind}-{i:06d}.tar" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards"]  # no temporary directory left behind
    expected = take(samples(9), 7)
    assert_samples_equal(list(read_shards(paths)), expected)
    assert_samples_equal(list(read_shards(str(out / f"shapeworld-{kind}-{{000000..000002}}.tar"))), expected)


def test_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="not an empty directory"):
        export_shards(tmp_path, "t2i", n=2, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_each_rank_reads_its_own_stream(monkeypatch):
    rank0 = take(iter(ShapeWorldStream("t2i", seed=1)), 4)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    rank1 = take(iter(ShapeWorldStream("t2i", seed=1)), 4)
    assert_samples_equal(rank1, take(t2i_samples(1, stream=(1, 0)), 4))
    assert not {fingerprint(s) for s in rank0} & {fingerprint(s) for s in rank1}


def test_export_is_byte_identical_and_fills_an_empty_directory(tmp_path):
    (tmp_path / "b").mkdir()
    a = export_shards(tmp_path / "a", "edit", n=3, seed=4, shard_size=2, progress=False)
    b = export_shards(tmp_path / "b", "edit", n=3, seed=4, shard_size=2, progress=False)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    calls = count()
    real_render = dataset.render

    def failing_render(scene):
        if next(calls) == 4:
            raise KeyboardInterrupt
        return real_render(scene)

    monkeypatch.setattr(dataset, "render", failing_render)
    with pytest.raises(KeyboardInterrupt):
        export_shards(tmp_path / "shards", "t2i", n=10, shard_size=2, progress=False)
    assert list(tmp_path.iterdir()) == []
