"""Training on your own data (own_data.py and the trainer's `data` setting): shards in img2dataset's layout, written
here, read in any size and mode; training on them resumes exactly, edit pairs train edit_sft, a semantic model reads its
blueprints off the images, bad input is a one-line error, and fine-tuning on 200 shard samples lowers their loss."""

from __future__ import annotations

import io
import json
import logging
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from blip3o_next.fileio import InputError
from blip3o_next.models.modeling import Blip3oNext
from blip3o_next.training.own_data import OwnData, fit_to_canvas
from blip3o_next.shapeworld.dataset import edit_samples, t2i_samples
from blip3o_next.training.checkpoints import latest_checkpoint
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.data import process_batch, sample_generators
from blip3o_next.training.stages import make_stage
from blip3o_next.training.trainer import evaluate_loss, train

from test_lora import LORA, sft_config

# How the t2i records vary, by index: (format, Pillow mode, size, members holding the caption).
VARIANTS = [("PNG", "RGB", (64, 64), ("txt",)), ("JPEG", "L", (96, 80), ("json",)),
            ("PNG", "RGBA", (80, 120), ("txt", "json")), ("WEBP", "P", (50, 50), ("empty txt", "json"))]
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}


def encoded(image: np.ndarray, fmt: str = "PNG", mode: str = "RGB", size: tuple[int, int] = (64, 64)) -> bytes:
    im = Image.fromarray(image).resize(size).convert(mode)
    buffer = io.BytesIO()
    im.save(buffer, format=fmt)
    return buffer.getvalue()


def t2i_record(index: int, sample: dict) -> dict:
    """A record as img2dataset writes it, in the variant of its index."""
    fmt, mode, size, text = VARIANTS[index % len(VARIANTS)]
    record = {"__key__": f"{index:09d}", EXTENSIONS[fmt]: encoded(sample["image"], fmt, mode, size)}
    if "txt" in text:
        record["txt"] = sample["caption"].encode()
    if "empty txt" in text:
        record["txt"] = b" "
    if "json" in text:
        record["json"] = json.dumps({"caption": sample["caption"], "url": "https://example.com", "status": "success"}).encode()
    return record


def edit_record(index: int, sample: dict) -> dict:
    return {"__key__": f"{index:09d}", "source.png": encoded(sample["source"]), "target.jpg": encoded(sample["target"], "JPEG"),
            "json": json.dumps({"instruction": sample["instruction"]}).encode()}


def write_shard(path: Path, records: list[dict]) -> str:
    with wds.TarWriter(str(path), encoder=False) as sink:
        for record in records:
            sink.write(record)
    return str(path)


def t2i_shards(folder: Path, counts: list[int], seed: int = 0) -> str:
    """Shards of data-engine renders and captions in img2dataset's layout; returns their brace pattern."""
    folder.mkdir(parents=True, exist_ok=True)
    samples = iter(enumerate(t2i_samples(seed, 64)))
    for n, count in enumerate(counts):
        write_shard(folder / f"{n:05d}.tar", [t2i_record(i, s) for i, s in islice(samples, count)])
    return str(folder / f"{{00000..{len(counts) - 1:05d}}}.tar")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """20 usable records in two shards; the first also holds a record without a caption and one without an image."""
    pattern = t2i_shards(tmp_path_factory.mktemp("own") / "shards", [12, 8])
    first = Path(pattern).parent / "00000.tar"
    with wds.TarWriter(str(first.with_suffix(".extra")), encoder=False) as sink:
        for record in wds.tarfile_samples([{"url": str(first)}]):
            sink.write({k: v for k, v in record.items() if k != "__url__"})
        sink.write({"__key__": "nocaption", "png": encoded(np.zeros((64, 64, 3), np.uint8))})
        sink.write({"__key__": "noimage", "txt": b"a caption without its image"})
    first.with_suffix(".extra").replace(first)
    return pattern


def captions(samples: list[dict]) -> list[str]:
    return [s["caption"] for s in samples]


def test_every_layout_mode_and_size_reads_once_per_epoch(shards, caplog):
    with caplog.at_level(logging.WARNING):
        data = OwnData(shards, canvas=64)
    assert len(data) == 20 and "00000.tar: skipped 2 of 14 records: 1 no caption, 1 no image" in caplog.text
    truth = list(islice(t2i_samples(0, 64), 20))
    epoch = [data.sample(i, seed=0) for i in range(20)]
    assert sorted(captions(epoch)) == sorted(captions(truth))  # each usable record once, with its caption from txt or json
    assert all(s["image"].shape == (64, 64, 3) and s["image"].dtype == np.uint8 and s["prompt"] == s["caption"] for s in epoch)
    assert np.array_equal(next(s["image"] for s in epoch if s["caption"] == truth[0]["caption"]), truth[0]["image"])  # lossless png
    next_epoch, other_seed = [data.sample(i, 0) for i in range(20, 40)], [data.sample(i, 1) for i in range(20)]
    assert sorted(captions(next_epoch)) == sorted(captions(epoch)) and captions(next_epoch) != captions(epoch) != captions(other_seed)
    assert captions([data.sample(i, 0) for i in (7, 3, 25)]) == captions([epoch[7], epoch[3], next_epoch[5]])  # random access


def test_images_are_center_cropped_then_resized():
    wide = np.zeros((64, 128, 3), np.uint8)
    wide[:, :32], wide[:, 32:96], wide[:, 96:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    fitted = fit_to_canvas(wide, 32)
    assert fitted.shape == (32, 32, 3) and (fitted[..., 1] > 200).all() and fitted[..., [0, 2]].max() < 32  # the green middle only


def test_processes_slice_the_batch_of_one_process(shards):
    cfg, data = TrainConfig(stage="vae", batch_size=6, data=shards), OwnData(shards, 64)
    halves = process_batch(cfg, 18, 0, 2, data) + process_batch(cfg, 18, 1, 2, data)
    whole = process_batch(cfg, 18, 0, 1, data)
    assert [s["index"] for s in whole] == list(range(18, 24)) and captions(halves) == captions(whole)


def test_sft_on_own_shards_resumes_exactly(shards, base_dir, tmp_path):
    config = lambda out: sft_config(base_dir, out, data=shards, lora=None, batch_size=6)
    train(config(tmp_path / "a"))
    train(config(tmp_path / "b"), stop_after=3)  # "killed" after step 3: step 3 is lost
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000002"
    train(config(tmp_path / "b"))
    a, b = (Blip3oNext.from_pretrained(tmp_path / run / "final").state_dict() for run in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_edit_pairs_train_edit_sft_and_are_skipped_elsewhere(base_dir, tmp_path, caplog):
    pairs, pictures = islice(edit_samples(0, 64), 6), islice(t2i_samples(0, 64), 2)
    shard = write_shard(tmp_path / "edits.tar", [edit_record(i, s) for i, s in enumerate(pairs)] + [t2i_record(6 + i, s) for i, s in enumerate(pictures)])
    data = OwnData(shard, 64, edits=True)
    read = [data.sample(i, 0) for i in range(len(data))]
    assert len(read) == 8 and sum("reference" in s for s in read) == 6
    edit = next(s for s in read if "reference" in s)
    assert edit["reference"].shape == edit["image"].shape == (64, 64, 3) and edit["caption"] == edit["prompt"]
    out = train(TrainConfig(stage="edit_sft", output_dir=str(tmp_path / "run"), init_from=str(base_dir), data=shard, steps=2, batch_size=4,
                            lr=1e-3, warmup_steps=1, checkpoint_every=2, log_every=1))
    assert Blip3oNext.from_pretrained(out / "final").config.editing
    with caplog.at_level(logging.WARNING):
        assert len(OwnData(shard, 64)) == 2 and "6 edit pair outside edit_sft" in caplog.text


def test_a_semantic_model_reads_own_images_into_its_blueprints(semantic_model, shards, tmp_path, monkeypatch):
    semantic_model.save_pretrained(tmp_path / "model")
    cfg = TrainConfig(stage="sft", output_dir=str(tmp_path / "run"), init_from=str(tmp_path / "model"), data=shards, steps=1, batch_size=4,
                      warmup_steps=1, checkpoint_every=1)
    stage = make_stage(cfg)
    encoder, read = stage.module.image_tokenizer, []
    monkeypatch.setattr(encoder, "encode", lambda x: read.append(len(x)) or type(encoder).encode(encoder, x))
    own = process_batch(cfg, 0, 0, 1, OwnData(shards, 64))
    loss, _ = stage.loss(stage.module, own, sample_generators(cfg, own))
    assert torch.isfinite(loss) and read == [4]  # no scene: the encoder reads the images
    engine = process_batch(TrainConfig(**{**cfg.__dict__, "data": None}), 0, 0, 1)
    stage.loss(stage.module, engine, sample_generators(cfg, engine))
    assert read == [4]  # the data engine's scenes give the exact blueprints
    assert Blip3oNext.from_pretrained(train(cfg) / "final").semantic


def test_bad_input_is_a_one_line_error(shards, tmp_path):
    def error(make) -> str:
        with pytest.raises(InputError) as e:
            make()
        assert "\n" not in str(e.value)
        return str(e.value)

    assert "matches no shard file" in error(lambda: OwnData(str(tmp_path / "none-*.tar"), 64))
    assert f"'{tmp_path / '0.tar'}' (from " in error(lambda: OwnData(str(tmp_path / "{0..1}.tar"), 64))  # names the missing file
    (tmp_path / "junk.tar").write_bytes(b"not a tar" * 100)
    assert "junk.tar: not a readable tar shard" in error(lambda: OwnData(str(tmp_path / "junk.tar"), 64))
    captionless = write_shard(tmp_path / "captionless.tar", [{"__key__": f"{i}", "jpg": encoded(np.zeros((8, 8, 3), np.uint8), "JPEG")} for i in range(2)])
    assert "captionless.tar: no usable sample in 2 records (2 no caption); each needs an image" in error(lambda: OwnData(captionless, 64))
    corrupt = write_shard(tmp_path / "corrupt.tar", [{"__key__": "000000007", "png": b"\x89PNG broken", "txt": b"a red circle"}])
    message = error(lambda: OwnData(corrupt, 64).sample(0, 0))
    assert "corrupt.tar: sample 000000007: png: not a readable image" in message
    with pytest.raises(ValueError, match="semantic_tokenizer stage learns from the data engine's scenes"):
        TrainConfig(stage="semantic_tokenizer", data=shards)
    with pytest.raises(InputError, match="matches no shard file"):  # before any model loads
        train(TrainConfig(stage="sft", output_dir=str(tmp_path / "run"), init_from="no-such-model", data=str(tmp_path / "x*.tar")))


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_fine_tuning_on_200_shard_samples_lowers_their_loss(lora, base_dir, tmp_path):
    """The must-show on the toy model (benchmarks/own_data_finetune.py runs it on the bundled tiny)."""
    pattern = t2i_shards(tmp_path / "shards", [50] * 4, seed=3)
    cfg = sft_config(base_dir, tmp_path / "run", data=pattern, lora=lora, steps=20, batch_size=10, lr=3e-3 if lora is None else 1e-2,
                     checkpoint_every=20)
    before = evaluate_loss(cfg, base_dir, 200)
    final = train(cfg) / "final"
    after = evaluate_loss(cfg, final, 200)
    assert after < 0.95 * before, (before, after)  # the toy model after 20 steps (LoRA: 8.42 -> 7.70)
    assert isinstance(Blip3oNext.from_pretrained(final), Blip3oNext)
