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
