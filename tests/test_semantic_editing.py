"""Editing on the semantic blueprint: the AR model reads the reference's blueprint (as the encoder reads its pixels) in
its prompt, an edit keeps the reference wherever its blueprint changes no object, and one model both edits and
generates after edit SFT."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from blip3o_next.models.autoregressive import SamplingConfig, build_sequences, forced_blueprint, sample_blueprint
from blip3o_next.cli import main
from blip3o_next.eval.suites import EditItem, edit_plan_summary
from blip3o_next.training.grpo import train_grpo
from blip3o_next.training.grpo_config import GRPOConfig
from blip3o_next.models.modeling import Blip3oNext
from blip3o_next.models.image_tokenizer import images_to_tensor
from blip3o_next.pipeline import INK_THRESHOLD, Pipeline, paste_kept_ink, unchanged_cells
from blip3o_next.models.semantic_blueprint import DEFAULT_VOCAB, KEEP_TOLERANCE, changed_region, encode_scene
from blip3o_next.shapeworld.edits import EDIT_CATEGORIES, parse_instruction, sample_edit
from blip3o_next.shapeworld.render import make_text, render
from blip3o_next.shapeworld.world import Scene, ShapeObject
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.trainer import train

SCENE = Scene(64, "white", (ShapeObject("circle", "red", 16.5, 16.5, 12), ShapeObject("square", "blue", 44.5, 44.5, 14)))


def box_mask(cx: float, cy: float, half: float, pad: float = 2.0) -> np.ndarray:
    centres = np.arange(64) + 0.5
    return (np.abs(centres[:, None] - cy) <= half + pad) & (np.abs(centres[None, :] - cx) <= half + pad)


def test_changed_region_covers_exactly_what_an_edit_changes():
    ids = encode_scene(SCENE)
    assert not changed_region(ids, ids).any()
    recolored = dataclasses.replace(SCENE, objects=(dataclasses.replace(SCENE.objects[0], color="green"), SCENE.objects[1]))
    np.testing.assert_array_equal(changed_region(encode_scene(recolored), ids), box_mask(16.5, 16.5, 6))
    moved = dataclasses.replace(SCENE, objects=(SCENE.objects[0], dataclasses.replace(SCENE.objects[1], cx=44.5, cy=20.5)))
    np.testing.assert_array_equal(changed_region(encode_scene(moved), ids), box_mask(44.5, 44.5, 7) | box_mask(44.5, 20.5, 7))
    removed = dataclasses.replace(SCENE, objects=SCENE.objects[:1])
    np.testing.assert_array_equal(changed_region(encode_scene(removed), ids), box_mask(44.5, 44.5, 7))
    assert changed_region(encode_scene(dataclasses.replace(SCENE, background="black")), ids).all()
    worded = dataclasses.replace(SCENE, text=make_text("HI", 44.5, 16.5, 12, "black"))
    region = changed_region(encode_scene(worded), ids)
    assert region[16, 44] and not region[16, 16] and not region[44, 44]


def test_changed_region_keeps_what_is_written_within_the_keep_tolerance():
    """A copy one bin off (a word centred on the canvas straddles a cell border) is the reference's, kept; a change of
    form, or a move beyond the tolerance, is redrawn."""
    worded = dataclasses.replace(SCENE, text=make_text("HI", 32.0, 30.0, 12, "black"))
    ids = encode_scene(worded)
    nudged = dataclasses.replace(
        worded, objects=(dataclasses.replace(SCENE.objects[0], cx=17.5), SCENE.objects[1]), text=make_text("HI", 31.0, 30.0, 12, "black"),
    )
    assert encode_scene(nudged) != ids  # the word's anchor moved to the neighbouring cell
    assert not changed_region(encode_scene(nudged), ids).any()
    far = dataclasses.replace(worded, objects=(dataclasses.replace(SCENE.objects[0], cx=16.5 + KEEP_TOLERANCE + 1), SCENE.objects[1]))
    assert changed_region(encode_scene(far), ids)[16, 16]
    respelled = dataclasses.replace(worded, text=make_text("HO", 31.0, 30.0, 12, "black"))
    region = changed_region(encode_scene(respelled), ids)
    assert region[30, 32] and not region[16, 16]


def test_a_new_background_keeps_the_reference_pixels_of_the_objects_the_edit_keeps():
    """A background edit redraws the whole image; the objects its blueprint keeps then take the reference's own
    pixels where those are ink, and the rest stays as drawn. An edit that keeps the background is left alone here."""
    reference = images_to_tensor(render(SCENE)[None])
    drawn = torch.zeros_like(reference)  # stands in for the renderer's output
    removed = dataclasses.replace(SCENE, background="black", objects=SCENE.objects[:1])
    out = paste_kept_ink(drawn, reference, torch.tensor([encode_scene(removed)]), torch.tensor([encode_scene(SCENE)]), DEFAULT_VOCAB)
    circle_ink = (reference[0] - 1).abs().amax(0) > INK_THRESHOLD  # white background
    circle_ink[:, 32:] = False
    assert circle_ink.sum() > 50
    assert torch.equal(out[0][:, circle_ink], reference[0][:, circle_ink])
    assert torch.equal(out[0][:, ~circle_ink], drawn[0][:, ~circle_ink])  # the background, and the removed square
    same = torch.tensor([encode_scene(SCENE)])
    assert torch.equal(paste_kept_ink(drawn, reference, same, same, DEFAULT_VOCAB), drawn)


def test_unchanged_cells_of_a_semantic_edit_hold_the_latent_cells_no_changed_box_touches():
    ids = torch.tensor([encode_scene(SCENE)])
    recolored = dataclasses.replace(SCENE, objects=(dataclasses.replace(SCENE.objects[0], color="green"), SCENE.objects[1]))
    codes = torch.tensor([encode_scene(recolored)])
    keep = unchanged_cells(codes, ids, 0, (16, 16), vocab=DEFAULT_VOCAB)
    assert keep.shape == (1, 1, 16, 16)
    changed = box_mask(16.5, 16.5, 6).reshape(16, 4, 16, 4).any(axis=(1, 3))  # any changed pixel marks its 4 px latent cell
    np.testing.assert_array_equal(keep[0, 0].numpy() == 0, changed)
    widened = unchanged_cells(codes, ids, 1, (16, 16), vocab=DEFAULT_VOCAB)
    assert (widened <= keep).all() and widened.sum() < keep.sum()
    assert unchanged_cells(ids, ids, 1, (16, 16), vocab=DEFAULT_VOCAB).eq(1).all()


def test_the_sampler_reads_a_reference_blueprint_in_the_prompt(semantic_model):
    """An edit's prompt holds the reference's image tokens, embedded through the factorised table; the sampled
    blueprint's states equal those of one teacher-forced pass."""
    model = semantic_model
    pipe = Pipeline(model)
    reference = encode_scene(SCENE)
    ids, mask = pipe.tokenize(["make the red circle green", "keep the image unchanged"], [reference, reference])
    bp = sample_blueprint(model.ar, ids, mask, model.image_vocab, model.num_image_tokens, SamplingConfig(top_k=0, top_p=1.0),
                          torch.Generator().manual_seed(0), embedding=model.image_embedding)
    forced = forced_blueprint(model.ar, model.image_vocab, ids, mask, bp.codes, model.image_embedding)
    assert torch.allclose(forced.hidden_states, bp.hidden_states, atol=1e-4)


@pytest.fixture(scope="module")
def semantic_edit_dir(semantic_model, tmp_path_factory):
    """The toy semantic model after two steps of edit SFT, with the bundled model's inference settings."""
    root = tmp_path_factory.mktemp("semantic_edit")
    semantic_model.save_pretrained(root / "t2i")
    cfg = TrainConfig(stage="edit_sft", output_dir=str(root / "out"), init_from=str(root / "t2i"), steps=2, batch_size=4, lr=1e-3,
                      warmup_steps=1, checkpoint_every=2, log_every=1, edit_fraction=0.5,
                      model={"edit_preserve_unchanged": True, "edit_paste_unchanged": True})
    train(cfg)
    return root / "out" / "final"


def test_semantic_edit_sft_gives_one_model_that_edits_and_generates(semantic_edit_dir):
    model = Blip3oNext.from_pretrained(semantic_edit_dir)
    assert model.semantic and model.config.editing and model.edit_ar is None  # one AR model writes both
    pipe = Pipeline(model)
    pair = sample_edit("recolor", np.random.default_rng(0))
    out = pipe.edit(render(pair.source), pair.instruction, seed=0, num_inference_steps=2)
    assert out.images[0].size == (64, 64) and out.blueprints.shape == (1, model.num_image_tokens)
    again = pipe.edit(render(pair.source), pair.instruction, seed=0, num_inference_steps=2)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))
    assert pipe("a photo of a red circle", seed=0, num_inference_steps=2).blueprints.shape == (1, model.num_image_tokens)


def test_a_planner_stage_trains_the_ar_side_alone_and_the_renderer_reads_through_the_starting_one(semantic_edit_dir, tmp_path, monkeypatch):
    """Stage 5c's form: with a reader, `train_only` the AR side, flow matching off and exact references, edit SFT
    encodes no latents and reads no image, changes only the AR model and its image embedding, and freezes the starting
    ones as the renderer's reader."""
    from blip3o_next.models.semantic_encoder import SemanticEncoder
    from blip3o_next.training import stages

    cfg = TrainConfig(stage="edit_sft", output_dir=str(tmp_path / "out"), init_from=str(semantic_edit_dir), steps=2, batch_size=4, lr=1e-2,
                      warmup_steps=1, checkpoint_every=2, log_every=1, edit_fraction=0.5, reader=True, train_only=["ar.", "image_embedding."],
                      edit_references="exact", model={"edit_preserve_unchanged": True, "edit_paste_unchanged": True, "flow_matching_weight": 0.0})
    with monkeypatch.context() as m:
        m.setattr("blip3o_next.models.vae.encode_latents", lambda *a, **k: pytest.fail("a CE-only stage must not encode latents"))
        m.setattr(SemanticEncoder, "encode", lambda *a, **k: pytest.fail("exact references need no encoder"))
        m.setattr(stages.EditStage, "preview", lambda self, module, samples: np.zeros((1, 8, 8, 3), np.uint8))
        out = train(cfg) / "final"
    before = Blip3oNext.from_pretrained(semantic_edit_dir).state_dict()
    after = Blip3oNext.from_pretrained(out).state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"ar", "image_embedding"}
    for part, reader in (("ar", "reader_ar"), ("image_embedding", "reader_embedding")):
        assert all(torch.equal(after[f"{reader}.{k.split('.', 1)[1]}"], v) for k, v in before.items() if k.split(".")[0] == part)
    resumed = TrainConfig(stage="edit_sft", output_dir=str(tmp_path / "next"), init_from=str(out), model={"edit_preserve_unchanged": True})
    assert stages.EditStage(resumed).module.config.flow_matching_weight == 1.0  # a later stage trains the renderer again
    pair = sample_edit("recolor", np.random.default_rng(0))
    assert Pipeline.from_pretrained(out).edit(render(pair.source), pair.instruction, seed=0, num_inference_steps=2).images[0].size == (64, 64)
    with pytest.raises(ValueError, match="reader freezes a trained model's AR side"):
        TrainConfig(stage="vae", reader=True)


def test_exact_references_are_the_source_scenes_own_blueprints():
    """`edit_references: exact`: each edit pair's reference blueprint is its source scene's, so every token the edit
    leaves alone is a copy; text-to-image samples have none."""
    from blip3o_next.training.stages import ModelStage

    pair = sample_edit("move", np.random.default_rng(1))
    edit = {"scene": pair.target.to_dict(), "source_scene": pair.source.to_dict(), "reference": render(pair.source)}
    t2i = {"scene": SCENE.to_dict()}
    kept, codes, references = ModelStage.exact_blueprints([edit, t2i], with_references=True)
    assert len(kept) == 2 and codes.tolist() == [encode_scene(pair.target), encode_scene(SCENE)]
    assert references == [encode_scene(pair.source), None]
    assert ModelStage.exact_blueprints([edit, t2i])[2] == [None, None]
    with pytest.raises(ValueError, match="edit_references must be one of"):
        TrainConfig(stage="edit_sft", init_from="tiny", edit_references="truth")
    with pytest.raises(ValueError, match="edit_references is an edit_sft setting"):
        TrainConfig(stage="sft", init_from="tiny", edit_references="exact")


def test_edit_change_weight_weighs_the_answer_tokens_that_differ_from_the_reference(semantic_edit_dir):
    """The edit's one changed token (the recolored circle's anchor) weighs edit_change_weight in the CE; copied
    tokens, the instruction and every token of a text-to-image row weigh 1."""
    model = Blip3oNext.from_pretrained(semantic_edit_dir)
    model.config.edit_change_weight = 5.0
    reference = encode_scene(SCENE)
    recolored = encode_scene(dataclasses.replace(SCENE, objects=(dataclasses.replace(SCENE.objects[0], color="green"), SCENE.objects[1])))
    slot = int(np.flatnonzero(np.asarray(recolored) != np.asarray(reference))[0])
    ids, mask, labels = build_sequences(model.tokenizer, model.image_vocab, ["make the red circle green", "a photo of a green circle"],
                                        torch.tensor([recolored, recolored]), 32, [reference, None])
    index = model.image_span(ids)
    weights = model.ce_token_weights(ids, index, torch.tensor([True, False]))
    assert weights[1].eq(1).all() and weights[0].eq(5).sum() == 1
    assert weights[0, index[0, 1 + slot] - 1] == 5  # the weight of predicting the answer's token in that slot
    model.config.edit_change_weight = 1.0
    assert model.ce_token_weights(ids, index, torch.tensor([True, False])).eq(1).all()


def test_a_semantic_edit_keeps_the_reference_outside_what_its_blueprint_changes(semantic_edit_dir):
    """Given the reference's own blueprint (as the encoder reads it) the output is the reference, pixel for pixel;
    given that blueprint with one object more, only the latent cells around the new object are drawn anew."""
    pipe = Pipeline(Blip3oNext.from_pretrained(semantic_edit_dir))
    source = render(SCENE)
    reference = pipe.edit_inputs(source, "keep the image unchanged").reference_codes
    kept = pipe.edit(source, "keep the image unchanged", seed=0, num_inference_steps=2, blueprints=reference)
    np.testing.assert_array_equal(np.asarray(kept.images[0]), source)
    codes = reference.clone()
    codes[0, DEFAULT_VOCAB.config.cell_positions[9]] = DEFAULT_VOCAB.shape_token("circle", "green", 12, 4, 4)  # centred in cell (1, 1)
    out = np.asarray(pipe.edit(source, "add a green circle", seed=0, num_inference_steps=2, blueprints=codes).images[0])
    keep = unchanged_cells(codes, reference, 0, (16, 16), vocab=DEFAULT_VOCAB)[0, 0].numpy().astype(bool)
    keep = keep.repeat(4, 0).repeat(4, 1)  # the latent cells held during sampling, at pixel size
    assert keep.any() and not keep.all()
    np.testing.assert_array_equal(out[keep], source[keep])
    assert not np.array_equal(out[~keep], source[~keep])


def test_edit_plan_score_checks_the_written_blueprint_against_source_and_instruction():
    pair = sample_edit("recolor", np.random.default_rng(3))
    right = EditItem("0", pair.instruction, pair.spec, render(pair.source), render(pair.target), pair.source, pair.target,
                     np.asarray(encode_scene(pair.target)))
    unchanged = dataclasses.replace(right, id="1", blueprint=np.asarray(encode_scene(pair.source)))
    summary = edit_plan_summary([right, unchanged])
    assert summary["categories"]["recolor"]["success"] == 0.5
    absent = dataclasses.replace(right, id="2", spec=parse_instruction("remove the yellow triangle"))  # not in the source
    assert edit_plan_summary([absent])["categories"]["remove"]["success"] == 0.0


def test_cli_eval_imgedit_reports_the_plan_score_of_a_semantic_model(semantic_edit_dir, tmp_path, capsys):
    assert main(["eval", "imgedit", "--model", str(semantic_edit_dir), "--per-category", "1", "--steps", "1",
                 "--json", str(tmp_path / "r.json"), "--grid", str(tmp_path / "g.png")]) == 0
    assert "plan score" in capsys.readouterr().out
    summary = json.loads((tmp_path / "r.json").read_text())["summary"]
    assert set(summary["plan"]["categories"]) == set(summary["categories"]) == set(EDIT_CATEGORIES)


def test_edit_grpo_on_plan_rewards_renders_nothing_and_trains_the_one_ar_side(semantic_edit_dir, tmp_path, monkeypatch):
    """Edit plan rewards need no diffusion: one GRPO step on edit pairs samples edit blueprints only, logs each plan
    reward, and changes only the AR model and its image embedding (which text to image shares)."""
    monkeypatch.setattr(Pipeline, "_render", lambda *a, **k: pytest.fail("plan-only rollouts must not render"))
    cfg = GRPOConfig(task="edit", init_from=str(semantic_edit_dir), output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=2,
                     num_generations=3, lr=1e-2, eval_per_category=0,
                     reward_weights={"success": 0, "partial": 0, "consistency": 0, "plan": 1, "plan_partial": 1})
    out = train_grpo(cfg)
    before = Blip3oNext.from_pretrained(semantic_edit_dir).state_dict()
    after = Blip3oNext.from_pretrained(out / "final").state_dict()
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"ar", "image_embedding"}
    with open(out / "metrics.csv") as f:
        (row,) = csv.DictReader(f)
    assert {"reward_plan", "reward_plan_partial"} <= set(row) and "reward_success" not in row and float(row["kl"]) == 0.0


def test_a_glyph_stage_trains_the_renderer_alone_on_the_words_ink(semantic_edit_dir, tmp_path, monkeypatch):
    """Stage 5e's form: `glyph_condition` widens the renderer's input (enable_glyphs) and, with `train_only` the
    transformer and the CE off, only the transformer changes; the saved model keeps the condition, and no later
    stage can take it away."""
    from blip3o_next.training import stages

    model = {"edit_preserve_unchanged": True, "glyph_condition": True, "ce_weight": 0.0}
    cfg = TrainConfig(stage="edit_sft", output_dir=str(tmp_path / "out"), init_from=str(semantic_edit_dir), steps=2, batch_size=4, lr=1e-2,
                      warmup_steps=1, checkpoint_every=2, log_every=1, edit_fraction=0.5, train_only=["transformer."], model=model)
    with monkeypatch.context() as m:
        m.setattr(stages.EditStage, "preview", lambda self, module, samples: np.zeros((1, 8, 8, 3), np.uint8))
        out = train(cfg) / "final"
    before = Blip3oNext.from_pretrained(semantic_edit_dir)
    after = Blip3oNext.from_pretrained(out)
    assert after.config.glyph_condition and after.transformer.config.in_channels == before.transformer.config.in_channels + 16
    old, new = before.state_dict(), after.state_dict()
    assert {k.split(".")[0] for k in old if old[k].shape == new[k].shape and not torch.equal(old[k], new[k])} == {"transformer"}
    glyph_weights = new["transformer.patch_embed.proj.weight"][:, -24:-8]  # after the latents and maps, before the reference
    assert glyph_weights.abs().sum() > 0  # trained from zero
    pair = sample_edit("text", np.random.default_rng(0))
    assert Pipeline(after).edit(render(pair.source), pair.instruction, seed=0, num_inference_steps=2).images[0].size == (64, 64)
    with pytest.raises(ValueError, match="cannot take it away"):
        stages.EditStage(TrainConfig(stage="edit_sft", output_dir=str(tmp_path / "next"), init_from=str(out), model={"glyph_condition": False}))
