"""The semantic tokenizer's learned encoder (image -> blueprint ids): labels, id assembly, learning, save/load."""

import numpy as np
import pytest
import torch

from blip3o_next.models.image_tokenizer import images_to_tensor
from blip3o_next.models.semantic_blueprint import encode_batch
from blip3o_next.models.semantic_encoder import CELL_FACTORS, SemanticEncoder
from blip3o_next.shapeworld.render import render
from blip3o_next.shapeworld.sampler import sample_scene

SMALL = dict(channels=(8, 16, 16, 32), width=32, layers=1, attention_heads=2)


@pytest.fixture(scope="module")
def scenes_and_ids():
    rng = np.random.default_rng(5)
    scenes = []
    while len(scenes) < 8:
        scene = sample_scene(rng, 64, text_probability=0.5)
        if scene.objects and any(s.text for s in scenes + [scene]):
            scenes.append(scene)
    return scenes, torch.from_numpy(encode_batch(scenes))


def test_labels_and_assembly_invert_each_other(scenes_and_ids):
    """Every true blueprint, split into its heads' targets and assembled back, gives the same ids."""
    _, ids = scenes_and_ids
    model = SemanticEncoder(**SMALL)
    targets = model._targets(ids)
    pad = model.readout["letter"].out_features - 1
    assert ((targets["letter"] == pad) == (ids[:, -4:] == model.vocab.pad_id)).all()
    pick = {name: t.clamp(min=0) for name, t in targets.items()}  # -100 (not applicable) -> any index: unused
    assert torch.equal(model.assemble(pick), ids)
    shape_cells = targets["shape"] >= 0
    assert shape_cells.any() and (targets["ink"][shape_cells] == -100).all()  # each head only where it applies
    assert set(CELL_FACTORS) <= set(targets)


def test_a_small_encoder_learns_to_read_a_batch(scenes_and_ids):
    scenes, ids = scenes_and_ids
    torch.manual_seed(0)
    model = SemanticEncoder(**SMALL)
    x = images_to_tensor(np.stack([render(s) for s in scenes]))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        out = model(x, ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.loss.item()
    assert out.loss.item() < 0.1 * first
    read = model.encode(x)
    assert read.shape == ids.shape and (read == ids).float().mean() > 0.9


def test_save_and_load_give_the_same_reading(scenes_and_ids, tmp_path):
    scenes, _ = scenes_and_ids
    model = SemanticEncoder(**SMALL).eval()
    model.save_pretrained(tmp_path / "enc")
    again = SemanticEncoder.from_pretrained(tmp_path / "enc", use_safetensors=True).eval()
    x = images_to_tensor(np.stack([render(s) for s in scenes]))
    assert torch.equal(model.encode(x), again.encode(x))


def test_mismatched_stem_is_refused():
    with pytest.raises(ValueError, match="not to a 8-cell grid"):
        SemanticEncoder(channels=(8, 16), width=16)


def test_the_training_stage_trains_and_exports_a_loadable_encoder(tmp_path):
    from blip3o_next.training.config import TrainConfig
    from blip3o_next.training.trainer import train

    cfg = TrainConfig(stage="semantic_tokenizer", output_dir=str(tmp_path / "run"), steps=2, batch_size=4, lr=1e-3, warmup_steps=1,
                      checkpoint_every=2, log_every=1, parts={"semantic_tokenizer": SMALL})
    final = train(cfg) / "final"
    model = SemanticEncoder.from_pretrained(final, use_safetensors=True)
    assert model.config.width == SMALL["width"]
    assert (tmp_path / "run" / "samples-0000002.png").is_file() and (tmp_path / "run" / "metrics.csv").is_file()


def _kind_logits(shape: dict[int, float], text: dict[int, float], cells: int = 64) -> torch.Tensor:
    """(1, cells, 3) logits whose softmax gives each listed cell those shape / text probabilities (rest EMPTY)."""
    p = torch.zeros(1, cells, 3)
    p[..., 0] = 1.0
    for cell, value in shape.items():
        p[0, cell] = torch.tensor([1 - value, value, 0.0])
    for cell, value in text.items():
        p[0, cell] = torch.tensor([1 - value - p[0, cell, 1].item(), p[0, cell, 1].item(), value])
    return p.clamp(min=1e-6).log()


def test_cell_kinds_read_the_scene_not_each_cell_alone():
    """One word, anchored where it is most likely even when no cell says so alone; a shape whose probability two cells
    share (a centre on a cell edge) kept at its peak; the same object read in two neighbouring cells kept once; two
    different objects in neighbouring cells both kept."""
    model = SemanticEncoder(**SMALL)
    identity = {"shape": torch.zeros(1, 64, 6), "color": torch.zeros(1, 64, 8)}
    identity["shape"][0, :, 0] = 1.0  # every cell reads shape 0 ...
    identity["color"][0, :, 0] = 1.0
    identity["color"][0, 30, 0], identity["color"][0, 30, 3] = 0.0, 1.0  # ... color 0, but cell 30 reads color 3
    kind = _kind_logits(shape={9: 0.3, 10: 0.2, 20: 0.9, 21: 0.8, 30: 0.9, 44: 0.3, 45: 0.1}, text={50: 0.3, 51: 0.35, 52: 0.1})
    kinds = model.cell_kinds({"kind": kind, **identity})[0]
    shapes = set(torch.nonzero(kinds == 1).flatten().tolist())
    assert torch.nonzero(kinds == 2).flatten().tolist() == [51]  # text mass 0.75 over three cells: one word, at its peak
    assert 9 in shapes and 10 not in shapes and 44 in shapes and 45 not in shapes  # edge objects at their peaks
    assert 20 in shapes and 21 not in shapes  # one object read twice: the more probable reading stays
    assert 30 in shapes  # a different object (another color) beside cell 21's and 20's neighbourhood stays
    assert model.cell_kinds({"kind": _kind_logits({}, {50: 0.2, 51: 0.2}), **identity})[0].max() == 0  # 0.4 of a word: none


def test_a_letter_reader_starts_as_the_encoder_it_is_added_to(scenes_and_ids, tmp_path):
    """Fine-tuning adds a letter reader to a trained encoder: the reader starts at the identity (same logits) and the
    stage refuses a config change that is not one."""
    from blip3o_next.training.stages import SemanticTokenizerStage

    scenes, _ = scenes_and_ids
    SemanticEncoder(**SMALL).eval().save_pretrained(tmp_path / "enc")
    start = SemanticEncoder.from_pretrained(tmp_path / "enc", use_safetensors=True).eval()
    grown = SemanticTokenizerStage.fine_tuned(str(tmp_path / "enc"), {"letter_reader_layers": 2, "letter_reader_side": 16}).eval()
    assert len(grown.letter_reader) == 2
    x = images_to_tensor(np.stack([render(s) for s in scenes]))
    before, after = start(x).logits, grown(x).logits
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    with pytest.raises(ValueError, match="may only add a letter reader; parts.semantic_tokenizer changes width"):
        SemanticTokenizerStage.fine_tuned(str(tmp_path / "enc"), {"width": 48})
    with pytest.raises(ValueError, match="letter_reader_side must be one of"):
        SemanticEncoder(**SMALL, letter_reader_layers=1, letter_reader_side=12)
