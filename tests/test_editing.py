"""Editing: the reference paths into the diffusion model, edit sequences, edit SFT and Pipeline.edit."""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from blip3o_next.models.autoregressive import build_sequences
from blip3o_next.cli import main
from blip3o_next.eval.suites import EditItem, evaluate_edits
from blip3o_next.models.diffusion import Condition, predict_velocity
from blip3o_next.models.modeling import Blip3oNext, enable_editing
from blip3o_next.pipeline import Pipeline
from blip3o_next.shapeworld.edits import EDIT_CATEGORIES, parse_instruction, sample_edit
from blip3o_next.shapeworld.render import render
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.data import is_edit_position
from blip3o_next.training.trainer import train
from blip3o_next.eval.verifier import SceneParser


@pytest.fixture(scope="module")
def t2i_dir(model_and_batch, tmp_path_factory):
    path = tmp_path_factory.mktemp("t2i") / "model"
    model_and_batch[0].save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def edit_dir(t2i_dir, tmp_path_factory):
    """A toy model after two steps of edit SFT from the t2i model."""
    out = tmp_path_factory.mktemp("edit_sft")
    cfg = TrainConfig(stage="edit_sft", output_dir=str(out), init_from=str(t2i_dir), steps=2, batch_size=4, lr=1e-3, warmup_steps=1,
                      checkpoint_every=2, log_every=1)
    train(cfg)
    return out / "final"


def test_edit_sequences_label_the_answer_not_the_reference(model_and_batch):
    model = model_and_batch[0]
    codes = torch.randint(0, 32, (2, model.num_image_tokens))
    reference = torch.randint(0, 32, (model.num_image_tokens,)).tolist()
    ids, mask, labels = build_sequences(model.tokenizer, model.image_vocab, ["make the red circle blue", "a star"], codes, 32, [reference, None])
    vocab = model.image_vocab
    row = ids[0][mask[0].bool()].tolist()
    starts = [i for i, t in enumerate(row) if t == vocab.im_start]
    assert len(starts) == 2  # the reference block, then the answer
    ref_block = slice(starts[0], starts[0] + model.num_image_tokens + 3)
    assert row[ref_block][2:-1] == [vocab.image_offset + c for c in reference]
    assert (labels[0, ref_block] == -100).all() and (labels[0, starts[1] :][mask[0, starts[1] :].bool()] != -100).all()
    assert (labels[0, : starts[0]] != -100).all()  # the instruction is labelled
    assert model.image_span(ids)[0, 0] == starts[1] + 1  # the diffusion model reads the answer's span
    assert model.image_span(ids)[1, 0] == ids[1].tolist().index(vocab.scales[0])


def test_reference_paths_shapes_and_switches(model_and_batch):
    model = enable_editing(_copy(model_and_batch[0]))
    b, (c, h, w) = 2, model.latent_shape
    span = torch.randn(b, model.span_length, model.ar.config.hidden_size)
    reference = torch.randn(b, c, h, w)
    cond = model.with_reference(model.condition(span), reference)
    assert cond.reference_tokens.shape == (b, h * w, model.transformer.config.caption_channels) and cond.reference is reference
    tokens, mask = cond.cross_attention_inputs()
    assert tokens.shape[1] == model.span_length + h * w and mask is None
    v = predict_velocity(model.transformer, torch.randn(b, c, h, w), cond, torch.full((b,), 500.0))
    assert v.shape == (b, c, h, w)  # the reference half of the width is discarded
    uncond = cond.zeroed()
    assert uncond.tokens.abs().sum() == 0 and uncond.reference is reference and uncond.reference_tokens is cond.reference_tokens
    model.config.reference_noise_injection = False
    assert model.with_reference(model.condition(span), reference).reference is None
    model.config.reference_cross_attention = False
    assert model.with_reference(model.condition(span), reference).reference_tokens is None


def test_channel_injection_starts_as_the_text_to_image_model(model_and_batch):
    model = model_and_batch[0]
    span = torch.randn(2, model.span_length, model.ar.config.hidden_size)
    x, t = torch.randn(2, *model.latent_shape), torch.full((2,), 300.0)
    with torch.no_grad():
        before = predict_velocity(model.transformer, x, model.condition(span), t)
        edit = enable_editing(_copy(model), reference_injection_axis="channels")
        assert edit.transformer.config.in_channels == model.transformer.config.in_channels + model.latent_shape[0]
        t2i = edit.condition(span)  # text-to-image in the editing model: an all-zero reference
        assert t2i.reference_channels.abs().sum() == 0
        cond = edit.with_reference(t2i, torch.randn(2, *model.latent_shape))
        assert cond.reference is None and cond.reference_channels.abs().sum() > 0
        cond.reference_tokens = None  # the new reference path alone: zero-initialised weights change nothing yet
        assert torch.allclose(predict_velocity(edit.transformer, x, cond, t), before, atol=1e-6)
        assert torch.allclose(predict_velocity(edit.transformer, x, t2i, t), before, atol=1e-6)


def test_condition_select_and_unconditional_keep_every_field():
    cond = Condition(torch.randn(3, 4, 5), torch.ones(3, 4, dtype=torch.long), torch.randn(3, 2, 6, 6), torch.randn(3, 2, 6, 6), torch.randn(3, 7, 5))
    sub = cond.select(torch.tensor([2, 0]))
    assert torch.equal(sub.reference, cond.reference[[2, 0]]) and torch.equal(sub.reference_tokens, cond.reference_tokens[[2, 0]])
    both = cond.with_unconditional()
    assert both.tokens.shape[0] == 6 and torch.equal(both.reference[:3], both.reference[3:]) and both.tokens[:3].abs().sum() == 0


def test_edit_positions_mix_every_batch():
    flags = [is_edit_position(i, 0.75) for i in range(64)]
    assert sum(flags) == 48 and all(1 <= sum(flags[i : i + 4]) <= 3 for i in range(0, 64, 4))


def test_edit_sft_yields_a_model_that_edits(edit_dir, t2i_dir):
    model = Blip3oNext.from_pretrained(edit_dir)
    assert model.config.editing and model.reference_connector is not None
    before = Blip3oNext.from_pretrained(t2i_dir)
    assert not before.config.editing and before.reference_connector is None
    pipe = Pipeline(model)
    pair = sample_edit("recolor", np.random.default_rng(0))
    out = pipe.edit(render(pair.source), pair.instruction, seed=0, num_inference_steps=2)
    again = pipe.edit(Image.fromarray(render(pair.source)), pair.instruction, seed=0, num_inference_steps=2)
    assert out.images[0].size == (64, 64) and out.blueprints.shape == (1, model.num_image_tokens)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))  # seeded; array and PIL inputs agree
    assert len(pipe.edit(render(pair.source), ["keep the image unchanged", pair.instruction], num_inference_steps=1).images) == 2


def test_separate_edit_ar_leaves_text_to_image_blueprints_unchanged(t2i_dir, tmp_path):
    cfg = TrainConfig(stage="edit_sft", output_dir=str(tmp_path), init_from=str(t2i_dir), steps=2, batch_size=4, lr=1e-3, warmup_steps=1,
                      checkpoint_every=2, log_every=1, model={"separate_edit_ar": True})
    model = Blip3oNext.from_pretrained(train(cfg) / "final")
    before = Blip3oNext.from_pretrained(t2i_dir)
    assert model.config.separate_edit_ar and model.edit_ar is not None
    assert all(torch.equal(a, b) for a, b in zip(model.ar.state_dict().values(), before.ar.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(model.edit_ar.state_dict().values(), before.ar.state_dict().values()))
    assert torch.equal(Pipeline(model)("a red circle", seed=3, num_inference_steps=1).blueprints,
                       Pipeline(before)("a red circle", seed=3, num_inference_steps=1).blueprints)
    pair = sample_edit("recolor", np.random.default_rng(0))
    pipe = Pipeline(model)
    edited = pipe.edit(render(pair.source), pair.instruction, seed=3, num_inference_steps=1).blueprints
    model.edit_ar.load_state_dict(model.ar.state_dict())  # the edit blueprint came from edit_ar: now it changes
    assert not torch.equal(pipe.edit(render(pair.source), pair.instruction, seed=3, num_inference_steps=1).blueprints, edited)


def test_edit_temperature_is_the_default_for_edits_only(edit_dir):
    model = Blip3oNext.from_pretrained(edit_dir)
    pipe, pair = Pipeline(model), sample_edit("recolor", np.random.default_rng(2))
    greedy_edit = pipe.edit(render(pair.source), pair.instruction, seed=4, num_inference_steps=1, temperature=0).blueprints
    sampled_t2i = pipe("a red circle", seed=4, num_inference_steps=1).blueprints
    model.config.edit_temperature = 0.0
    assert torch.equal(pipe.edit(render(pair.source), pair.instruction, seed=4, num_inference_steps=1).blueprints, greedy_edit)
    assert torch.equal(pipe("a red circle", seed=4, num_inference_steps=1).blueprints, sampled_t2i)  # text to image keeps its own
    with pytest.raises(ValueError, match="edit_temperature"):
        type(model.config)(edit_temperature=-1.0)


def test_edit_accepts_any_mode_and_size_with_a_notice(edit_dir, caplog):
    pipe = Pipeline(Blip3oNext.from_pretrained(edit_dir))
    rgb = Image.fromarray(render(sample_edit("keep", np.random.default_rng(1)).source))
    for image in (rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("P")):
        assert pipe.edit(image, "keep the image unchanged", seed=0, num_inference_steps=1).images[0].size == (64, 64)
    with caplog.at_level(logging.WARNING, logger="blip3o_next.pipeline"):
        out = pipe.edit(rgb.resize((100, 80)), "keep the image unchanged", seed=0, num_inference_steps=1)
    assert out.images[0].size == (64, 64) and "resized" in caplog.text and "100x80" in caplog.text


def test_edit_bad_input_is_a_clear_error(edit_dir, t2i_dir):
    pipe = Pipeline(Blip3oNext.from_pretrained(edit_dir))
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(ValueError, match="instruction 0 is empty"):
        pipe.edit(image, "  ")
    with pytest.raises(ValueError, match="expected a PIL image"):
        pipe.edit("not an image", "keep the image unchanged")
    with pytest.raises(ValueError, match="do not pair up"):
        pipe.edit([image] * 2, ["a", "b", "c"])
    with pytest.raises(ValueError, match="not trained to edit"):
        Pipeline(Blip3oNext.from_pretrained(t2i_dir)).edit(image, "keep the image unchanged")


# ----------------------------------------------------------------------------- CLI and evaluation


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def source_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("edit-cli") / "source.png"
    Image.fromarray(render(sample_edit("recolor", np.random.default_rng(3)).source)).save(path)
    return path


def test_cli_edit_writes_outputs(edit_dir, source_png, tmp_path, capsys):
    code, out, _ = run_cli(["edit", source_png, "keep the image unchanged", "-o", tmp_path / "e.png", "-n", "2", "--steps", "1",
                            "--model", edit_dir, "--grid", tmp_path / "grid.png", "--show-blueprint"], capsys)
    assert code == 0 and "wrote" in out
    assert all(Image.open(tmp_path / f"e_{i:03d}.png").size == (64, 64) for i in range(2))
    assert (tmp_path / "e_000_blueprint.png").is_file() and (tmp_path / "grid.png").is_file()


@pytest.mark.parametrize(
    "case, must_name",
    [("corrupt", "not a readable image"), ("text", "not a readable image"), ("missing", "no such file"), ("empty", "instruction is empty"),
     ("t2i", "not trained to edit")],
)
def test_cli_edit_bad_input(case, must_name, edit_dir, t2i_dir, source_png, tmp_path, capsys):
    image, instruction, model = source_png, "make the red circle blue", edit_dir
    if case == "corrupt":
        image = tmp_path / "broken.png"
        image.write_bytes(source_png.read_bytes()[:80])
    elif case == "text":
        image = tmp_path / "notes.png"
        image.write_text("not an image")
    elif case == "missing":
        image = tmp_path / "nowhere.png"
    elif case == "empty":
        instruction = " "
    else:
        model = t2i_dir
    code, _, err = run_cli(["edit", image, instruction, "-o", tmp_path / "out.png", "--model", model, "--steps", "1"], capsys)
    assert code == 2 and err.startswith("blip3o: error: ") and err.count("\n") == 1 and must_name in err
    assert not (tmp_path / "out.png").exists()


def test_cli_edit_of_an_absent_object_still_writes_and_scores_as_failed(edit_dir, source_png, tmp_path, capsys):
    code, _, _ = run_cli(["edit", source_png, "remove the purple star", "-o", tmp_path / "out.png", "--model", edit_dir, "--steps", "1"], capsys)
    assert code == 0 and (tmp_path / "out.png").is_file()
    source = np.asarray(Image.open(source_png))
    item = EditItem("x", "remove the purple star", parse_instruction("remove the purple star"), source, np.asarray(Image.open(tmp_path / "out.png")),
                    SceneParser().parse(source), None)
    rows, summary = evaluate_edits([item])
    assert rows[0]["passed"] is False and summary["categories"]["remove"]["success"] == 0.0


def test_cli_eval_imgedit_covers_every_category(edit_dir, tmp_path, capsys):
    code, out, _ = run_cli(["eval", "imgedit", "--model", edit_dir, "--per-category", 1, "--steps", 1, "--json", tmp_path / "r.json",
                            "--grid", tmp_path / "g.png"], capsys)
    assert code == 0 and ">=30dB" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["summary"]["categories"]) == set(EDIT_CATEGORIES) and report["summary"]["n"] == len(EDIT_CATEGORIES)
    assert report["summary"]["settings"]["per_category"] == 1 and (tmp_path / "g.png").is_file()


def _copy(model: Blip3oNext) -> Blip3oNext:
    import copy

    return copy.deepcopy(model)


def test_pasting_puts_the_reference_pixels_back_only_where_the_blueprint_kept_them(edit_dir):
    model = Blip3oNext.from_pretrained(edit_dir)
    model.config.edit_preserve_unchanged = True
    pipe, source = Pipeline(model), render(sample_edit("keep", np.random.default_rng(1)).source)
    reference_codes = pipe.edit_inputs(source, "keep the image unchanged").reference_codes

    def edit(paste: bool):
        model.config.edit_paste_unchanged = paste
        return pipe.edit(source, "keep the image unchanged", seed=0, num_inference_steps=2)

    plain, pasted = edit(False), edit(True)
    assert torch.equal(plain.blueprints, pasted.blueprints)
    side = int(reference_codes.shape[1] ** 0.5)
    kept = (pasted.blueprints == reference_codes).view(side, side).numpy()
    kept = kept.repeat(source.shape[0] // side, axis=0).repeat(source.shape[1] // side, axis=1)
    assert kept.any() and not kept.all()  # both kinds of cell occur, so both checks below bite
    np.testing.assert_array_equal(np.asarray(pasted.images[0])[kept], source[kept])
    np.testing.assert_array_equal(np.asarray(pasted.images[0])[~kept], np.asarray(plain.images[0])[~kept])


def test_an_edit_given_the_reference_codes_as_its_blueprint_returns_the_reference(edit_dir):
    """`blueprints=` on edits: a blueprint equal to the reference's codes keeps every cell, so with preservation and
    pasting the output is the reference itself, pixel for pixel; without preservation it is drawn anew."""
    model = Blip3oNext.from_pretrained(edit_dir)
    model.config.edit_preserve_unchanged = model.config.edit_paste_unchanged = True
    pipe, source = Pipeline(model), render(sample_edit("recolor", np.random.default_rng(2)).source)
    reference_codes = pipe.edit_inputs(source, "keep the image unchanged").reference_codes
    kept = pipe.edit(source, "make it different", seed=0, num_inference_steps=2, blueprints=reference_codes)
    redrawn = pipe.edit(source, "make it different", seed=0, num_inference_steps=2, blueprints=reference_codes, preserve_unchanged=False)
    assert torch.equal(kept.blueprints, reference_codes.cpu())
    np.testing.assert_array_equal(np.asarray(kept.images[0]), source)
    assert not np.array_equal(np.asarray(redrawn.images[0]), source)
