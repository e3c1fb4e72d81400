"""The whole model: joint loss, image-span checks, save -> load, checkpoint errors, and the next-3b preset's size."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from blip3o_next.models.modeling import Blip3oNext, CheckpointError, read_config

from blip3o_next.models.presets import meta_parameter_counts, next3b_parts_configs


def test_joint_loss(model_and_batch):
    model, (ids, mask, labels, latents) = model_and_batch
    out = model(ids, mask, labels, latents, torch.Generator().manual_seed(0))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.allclose(out.loss, out.ce_loss + out.flow_matching_loss)
    assert model.span_length == 65 and model.latent_shape == (8, 16, 16)


def test_image_span_is_validated(model_and_batch):
    model, (ids, *_rest) = model_and_batch
    assert model.image_span(ids).shape == (2, 65)
    broken = ids.clone()
    broken[:, -5] = 3  # a text token inside the image span
    with pytest.raises(ValueError, match="image tokens, expected 64"):
        model.image_span(broken)


def test_save_load_identical(model_and_batch, tmp_path):
    model, batch = model_and_batch
    model.save_pretrained(tmp_path / "ckpt")
    again = Blip3oNext.from_pretrained(tmp_path / "ckpt")
    a = model(*batch, generator=torch.Generator().manual_seed(1))
    b = again(*batch, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.loss, b.loss)
    assert not list(tmp_path.glob(".ckpt.*"))  # no temporary folder left behind


def test_checkpoint_errors_name_the_file_and_tensor(model_and_batch, tmp_path):
    model, _ = model_and_batch
    model.save_pretrained(tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "connector" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["proj_out.weight"] = torch.zeros(3, 3)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match="proj_out.weight"):
        Blip3oNext.from_pretrained(tmp_path / "ckpt")
    weights.unlink()
    with pytest.raises(CheckpointError, match="connector"):
        Blip3oNext.from_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "blip3o_config.json").unlink()
    with pytest.raises(CheckpointError, match="blip3o_config.json"):
        Blip3oNext.from_pretrained(tmp_path / "ckpt")


def test_next3b_preset_size_on_meta_device():
    counts = meta_parameter_counts(next3b_parts_configs())
    # Qwen3-1.7B (tied embeddings) with 65,541 added tokens; SANA 1.5 1.6B; DC-AE f32c32; the 2048 -> 2304 connector.
    assert 1.8e9 < counts["ar"] < 2.0e9
    assert 1.5e9 < counts["transformer"] < 1.7e9
    assert 2.5e8 < counts["vae"] < 4.0e8
    assert counts["connector"] == 2048 * 2304 + 2304 + 2304 * 2304 + 2304 + 2304


def test_prompt_conditioning_ablation_ignores_the_blueprint(model_and_batch):
    """condition_source="prompt": the flow-matching loss does not change when the image tokens do."""
    import copy
    import dataclasses

    from blip3o_next.pipeline import Pipeline

    from diffusers import SanaTransformer2DModel

    from blip3o_next.models.connector import Connector

    model = copy.deepcopy(model_and_batch[0])
    model.config = dataclasses.replace(model.config, condition_source="prompt")
    with pytest.raises(ValueError, match="spatial maps need the blueprint"):
        model._check_parts()
    model.connector = Connector.from_config({**model.connector.config, "spatial_channels": 0})
    model.transformer = SanaTransformer2DModel.from_config({**model.transformer.config, "in_channels": model.vae.config.latent_channels})
    model._check_parts()
    ids, mask, labels, latents = model_and_batch[1]
    other = ids.clone()
    image = (ids >= model.image_vocab.image_offset) & (ids < model.image_vocab.vocab_end)
    other[image] = model.image_vocab.image_offset + (ids[image] - model.image_vocab.image_offset + 1) % model.image_vocab.codebook_size
    with torch.no_grad():
        a = model(ids, mask, labels, latents, torch.Generator().manual_seed(0))
        b = model(other, mask, other.masked_fill(mask == 0, -100), latents, torch.Generator().manual_seed(0))
    assert torch.equal(a.flow_matching_loss, b.flow_matching_loss) and not torch.equal(a.ce_loss, b.ce_loss)
    out = Pipeline(model)(["a photo of a star", "a photo of two red circles above a cross"], seed=0, num_inference_steps=2)
    assert len(out.images) == 2


def test_config_of_a_removed_field_loads_only_at_its_implemented_value(tmp_path):
    # A checkpoint saved before `edit_preserve_margin` was removed (always 0) still loads; another value, which the
    # code no longer implements, is a clear error, as is any key the config never had.
    import json
    from blip3o_next.pipeline import resolve_model_path

    config = json.loads((resolve_model_path("tiny") / "blip3o_config.json").read_text())
    for extra, error in (({"edit_preserve_margin": 0}, None), ({"edit_preserve_margin": 1}, "edit_preserve_margin=1 is no longer supported"),
                         ({"no_such_field": 1}, "no_such_field")):
        (tmp_path / "blip3o_config.json").write_text(json.dumps({**config, **extra}))
        if error is None:
            assert read_config(tmp_path).edit_temperature == config["edit_temperature"]
        else:
            with pytest.raises(CheckpointError, match=error):
                read_config(tmp_path)
