"""The semantic blueprint inside the model: the factorised image-token embedding gives exact log-probs, the sampler
draws only ids a position allows, the connector paints object footprints, and a semantic model trains (with EMA,
resuming exactly), saves, loads and generates."""

import copy
import csv
import json
from dataclasses import replace
from itertools import islice

import numpy as np
import pytest
import torch

from blip3o_next.models.autoregressive import (
    SamplingConfig, ar_hidden_states, build_sequences, forced_blueprint, kind_first_argmax, kind_first_sample, kind_mass, sample_blueprint,
    sample_categorical, sample_hierarchy,
)
from blip3o_next.cli import main
from blip3o_next.models.connector import Connector
from blip3o_next.fileio import InputError
from blip3o_next.training.grpo import Policy, policy_update, train_grpo
from blip3o_next.training.grpo_config import GRPOConfig
from blip3o_next.training.grpo_tasks import Rollouts
from blip3o_next.training.rewards import RewardFunction
from blip3o_next.models.image_tokenizer import images_to_tensor
from blip3o_next.models.modeling import Blip3oNext, enable_glyphs
from blip3o_next.pipeline import Pipeline
from blip3o_next.models.semantic_blueprint import DEFAULT_VOCAB, TokenKind, decode_tokens, encode_scene, glyph_ink, preview
from blip3o_next.models.semantic_embedding import MIN_SPACE, SemanticEmbedding, token_log_probs, word_centre_band
from blip3o_next.models.semantic_encoder import SemanticEncoder
from blip3o_next.shapeworld.dataset import t2i_samples
from blip3o_next.shapeworld.sampler import sample_scene
from blip3o_next.shapeworld.render import make_text, render
from blip3o_next.shapeworld.world import MARGIN, Scene, ShapeObject
from blip3o_next.training.checkpoints import latest_checkpoint
from blip3o_next.training.config import TrainConfig
from blip3o_next.training.trainer import train
from blip3o_next.models.vae import encode_latents

from conftest import small_configs

PROMPTS = ["a photo of a red circle left of a blue star", "a photo of the word \"HI\""]


def left_padded(model: Blip3oNext, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The prompts' token ids, left-padded, and their attention mask, as the sampler takes them."""
    tok = model.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    width = max(map(len, tok))
    ids = torch.tensor([[model.tokenizer.pad_token_id] * (width - len(r)) + r for r in tok])
    return ids, torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in tok])


def batch(model: Blip3oNext, n: int = 2):
    samples = list(islice(t2i_samples(0, 64), n))
    codes = torch.tensor([encode_scene(Scene.from_dict(s["scene"])) for s in samples])
    ids, mask, labels = build_sequences(model.tokenizer, model.image_vocab, [s["caption"] for s in samples], codes, 32)
    with torch.no_grad():
        latents = encode_latents(model.vae, images_to_tensor(np.stack([s["image"] for s in samples])))
    return ids, mask, labels, latents


def test_log_probs_form_a_distribution_over_each_positions_ids():
    torch.manual_seed(0)
    embedding = SemanticEmbedding(16, init_std=0.5)
    hidden = torch.randn(6, 16)
    positions = [0, 1, 30, 64, 65, 68]
    full = torch.stack([embedding.full_log_probs(h[None], p)[0] for h, p in zip(hidden, positions)])
    assert torch.allclose(full.exp().sum(-1), torch.ones(6), atol=1e-5)
    assert torch.equal(full.isfinite(), embedding.position_mask[positions])  # every allowed id, and only those
    ids = torch.multinomial(full.exp(), 1).squeeze(1)
    assert torch.allclose(embedding.log_probs(hidden, ids, torch.tensor(positions)), full.gather(1, ids[:, None]).squeeze(1), atol=1e-5)


def test_one_head_per_object_whatever_its_offset():
    embedding = SemanticEmbedding(8)
    ids = [DEFAULT_VOCAB.shape_token("star", "red", 12, dx, dy) for dx, dy in ((0, 0), (3, 5), (7, 7))]
    heads = embedding.head_of[ids]
    assert len(set(heads.tolist())) == 1
    assert embedding.head_of[DEFAULT_VOCAB.shape_token("star", "blue", 12, 0, 0)] != heads[0]
    assert embedding.head.num_embeddings == 3 + 1 + 6 * 8 * 15 + 10 * 5 + 26 + 1


def test_sampler_draws_only_allowed_ids_and_forcing_them_gives_the_same_states(semantic_model):
    model = semantic_model
    ids, mask = left_padded(model, PROMPTS)
    bp = sample_blueprint(model.ar, ids, mask, model.image_vocab, model.num_image_tokens, SamplingConfig(top_k=0, top_p=1.0),
                          torch.Generator().manual_seed(0), embedding=model.image_embedding)
    allowed = torch.from_numpy(np.array(DEFAULT_VOCAB.position_mask()))
    assert bp.codes.shape == (2, DEFAULT_VOCAB.config.seq_len)
    assert allowed[torch.arange(bp.codes.shape[1]), bp.codes].all()  # a random model still writes a well-formed blueprint
    for row in bp.codes:
        boxes = [o.box for o in decode_tokens(row).objects]
        assert all(MIN_SPACE <= b.x0 and b.x1 <= 64 - MIN_SPACE and MIN_SPACE <= b.y0 and b.y1 <= 64 - MIN_SPACE for b in boxes)
        assert all(a.gap_to(b) >= MIN_SPACE for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    forced = forced_blueprint(model.ar, model.image_vocab, ids, mask, bp.codes, model.image_embedding)
    assert torch.allclose(forced.hidden_states, bp.hidden_states, atol=1e-4)


def test_the_sampler_constraint_keeps_every_true_blueprint_and_refuses_overlaps_and_overhangs():
    embedding = SemanticEmbedding(8)
    rng = np.random.default_rng(0)
    rows = []
    while len(rows) < 60:
        try:
            rows.append(encode_scene(sample_scene(rng, 64)))
        except ValueError:  # two anchors in one cell: the codec refuses the scene
            continue
    written = torch.tensor(rows)
    assert all(embedding.allowed(written[:, :s])[torch.arange(len(rows)), written[:, s]].all() for s in range(written.shape[1]))
    c = DEFAULT_VOCAB.config
    blank = [DEFAULT_VOCAB.background_token("white")] + [DEFAULT_VOCAB.empty_id] * c.n_cells
    first = list(blank)
    first[c.cell_positions[9]] = DEFAULT_VOCAB.shape_token("circle", "red", 12, 4, 4)  # centre (12.5, 12.5), side 12
    next_cell = embedding.allowed(torch.tensor([first[: c.cell_positions[10]]]))[0]  # x 16..24
    assert not next_cell[DEFAULT_VOCAB.shape_token("star", "blue", 12, 4, 4)]  # centre 20.5: the boxes overlap
    assert next_cell[DEFAULT_VOCAB.empty_id] and next_cell[DEFAULT_VOCAB.text_token("black", 12, 0, 0)]
    two_on = embedding.allowed(torch.tensor([first[: c.cell_positions[11]]]))[0]  # x 24..32
    assert two_on[DEFAULT_VOCAB.shape_token("star", "blue", 10, 2, 4)]  # centre 26.5, side 10: 3 px apart
    assert not two_on[DEFAULT_VOCAB.shape_token("star", "blue", 14, 0, 4)]  # centre 24.5, side 14: 0 px apart
    corner = embedding.allowed(torch.tensor([blank[: c.cell_positions[0]]]))[0]  # the top-left cell
    assert not corner[DEFAULT_VOCAB.shape_token("circle", "red", 20, 0, 0)] and corner[DEFAULT_VOCAB.shape_token("circle", "red", 10, 7, 7)]


def test_the_sampler_keeps_a_word_where_the_data_engine_can_put_it():
    """A text anchor's word stays in the band of heights the data engine uses: every word at its top-most and
    bottom-most legal height is allowed, and one bin beyond is not."""
    embedding, c = SemanticEmbedding(8), DEFAULT_VOCAB.config
    for cap in range(c.cap_range[0], c.cap_range[1] + 1):
        for word in ("I", "W", "Q", "HI", "MAZE"):
            probe = make_text(word, 32, 32, float(cap), "black")
            for cy in (MARGIN + probe.height / 2, 64 - MARGIN - probe.height / 2):
                ids = encode_scene(Scene(canvas=64, background="white", objects=(), text=make_text(word, 32, cy, float(cap), "black")))
                at = next(k for k in c.cell_positions if DEFAULT_VOCAB.factors(ids[k]).kind == TokenKind.TEXT)
                assert embedding.allowed(torch.tensor([ids[:at]]))[0, ids[at]], (word, cap, cy)
    blank = [DEFAULT_VOCAB.background_token("white")] + [DEFAULT_VOCAB.empty_id] * c.n_cells
    low, high = word_centre_band(c)
    top_row = embedding.allowed(torch.tensor([blank[: c.cell_positions[3]]]))[0]  # the first row: centres 0.5 .. 7.5
    for dy in range(8):
        assert top_row[DEFAULT_VOCAB.text_token("black", 10, 3, dy)] == (dy + 0.5 >= low[0])
    bottom_row = embedding.allowed(torch.tensor([blank[: c.cell_positions[59]]]))[0]  # the last row: 56.5 .. 63.5
    assert [bool(bottom_row[DEFAULT_VOCAB.text_token("white", 14, 3, dy)]) for dy in range(8)] == [56 + dy + 0.5 <= high[-1] for dy in range(8)]


def test_training_log_probs_match_the_samplers_distribution(semantic_model):
    """The CE the model trains on is the log-probability the sampler draws with."""
    model = semantic_model
    ids, mask, labels, _ = batch(model, 1)
    with torch.no_grad():
        hidden = ar_hidden_states(model.ar, ids, mask, model.image_vocab, model.image_embedding)
        log_p = token_log_probs(model.ar, model.image_embedding, hidden[:, :-1], labels[:, 1:], ids, model.image_vocab)
    start = int((ids[0] == model.image_vocab.scales[0]).nonzero()[-1])  # the <S0> before the blueprint
    for k in (0, 1, 40, 66):  # the background, two cells, a letter slot
        want = model.image_embedding.full_log_probs(hidden[0, start + k][None], k)[0, ids[0, start + 1 + k] - model.image_vocab.image_offset]
        assert torch.isclose(log_p[0, start + k], want, atol=1e-4)


def test_footprint_map_paints_each_object_over_its_box():
    connector = Connector(hidden_size=4, width=8, footprint_channels=4)
    with torch.no_grad():
        connector.footprint_proj.weight.copy_(torch.eye(4))
        connector.footprint_proj.bias.zero_()
    states = torch.zeros(1, 69, 4)
    states[0, 18] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    boxes = torch.tensor([[[18, 20.0, 20.0, 4.0, 4.0], [0, 0.0, 0.0, 0.0, 0.0]]])
    out = connector.footprint_map(states, boxes, torch.tensor([[True, False]]), side=16, canvas=64)
    assert out.shape == (1, 6, 16, 16)
    inside = out[0, 0] != 0
    # latent cells of 4 px whose centres lie within half a side plus one cell (4 + 4 px) of the centre 20: cells 3..6
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[3:7, 3:7] = True
    assert torch.equal(inside, want)
    assert torch.equal(out[0, 1][want], torch.full((16,), 2.0))
    assert out[0, 4, 3, 3] < 0 < out[0, 4, 3, 6] and out[0, 5, 3, 4] < 0 < out[0, 5, 6, 4]  # x, y offsets from the centre


def test_glyph_ink_is_the_words_ink_where_the_data_engine_draws_it():
    """The glyph condition reads the word from the blueprint alone: black ink on white renders as 255 * (1 - ink)."""
    ids = encode_scene(Scene(64, "white", (ShapeObject("circle", "red", 14.0, 14.0, 12.0),), make_text("HAT", 36.0, 44.0, 12.0, "black")))
    ink = glyph_ink(ids)
    drawn = render(decode_tokens(ids))
    assert ink.shape == (64, 64) and ink.max() == 1.0 and ink[:20, :20].sum() == 0  # the circle is no glyph
    text = ink > 0
    assert np.array_equal(drawn[text, 2], np.rint(255 * (1 - ink[text])).astype(np.uint8))
    assert not glyph_ink(encode_scene(Scene(64, "gray"))).any()


def test_enable_glyphs_adds_zero_weight_channels_that_the_condition_fills_from_the_blueprint(semantic_model):
    model = copy.deepcopy(semantic_model)
    ids = torch.tensor([encode_scene(Scene(64, "white", (), make_text("HI", 30.0, 30.0, 12.0, "black")))])
    states = torch.randn(1, model.span_length, model.ar.config.hidden_size, generator=torch.Generator().manual_seed(0))
    latents = torch.randn(1, *model.latent_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500.0])
    from blip3o_next.models.diffusion import predict_velocity

    before = model.condition(states, codes=ids)
    v = predict_velocity(model.transformer, latents, before, t)
    channels = model.transformer.config.in_channels
    enable_glyphs(model)
    after = model.condition(states, codes=ids)
    assert model.transformer.config.in_channels == channels + 16 and after.spatial.shape[1] == before.spatial.shape[1] + 16
    assert torch.equal(after.spatial[:, : before.spatial.shape[1]], before.spatial)
    glyphs = after.spatial[:, before.spatial.shape[1] :]
    assert torch.isclose(glyphs.sum(), torch.from_numpy(glyph_ink(ids[0])).sum()) and glyphs.sum() > 0
    assert torch.allclose(predict_velocity(model.transformer, latents, after, t), v, atol=1e-6)  # zero weights: renders as before
    enable_glyphs(model)  # idempotent
    assert model.transformer.config.in_channels == channels + 16


def test_semantic_model_trains_saves_loads_and_generates(semantic_model, tmp_path):
    model = semantic_model
    out = model.train()(*batch(model), generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.image_embedding.head.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model.eval().save_pretrained(tmp_path / "m")
    loaded = Blip3oNext.from_pretrained(tmp_path / "m")
    assert loaded.semantic and isinstance(loaded.image_tokenizer, SemanticEncoder)
    state = model.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    result = Pipeline(loaded)(PROMPTS[:1], seed=0, num_inference_steps=2)
    assert result.images[0].size == (64, 64)
    assert np.array_equal(np.asarray(result.blueprint_previews[0]), np.asarray(preview(result.blueprints[0])))


def test_semantic_pretrain_with_ema_resumes_exactly(semantic_model, tmp_path):
    model = semantic_model
    root = tmp_path / "parts"
    model.tokenizer.save_pretrained(root / "text_tokenizer")
    model.image_tokenizer.save_pretrained(root / "image_tokenizer")
    model.vae.save_pretrained(root / "vae")
    parts = {k: v for k, v in small_configs(0, semantic=True).items() if k in ("ar", "connector", "transformer")}
    parts["ar"].pop("vocab_size")

    def config(out):
        return TrainConfig(stage="pretrain", output_dir=str(out), steps=4, batch_size=2, lr=3e-3, warmup_steps=1, checkpoint_every=2,
                           log_every=1, ema_decay=0.5, text_tokenizer_dir=str(root / "text_tokenizer"),
                           image_tokenizer_dir=str(root / "image_tokenizer"), vae_dir=str(root / "vae"), parts=parts,
                           model={"timestep_sampling": "logit_normal", "top_k": 0, "top_p": 1.0})

    train(config(tmp_path / "a"))
    train(config(tmp_path / "b"), stop_after=3)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-0000002"
    train(config(tmp_path / "b"))
    a, b = (Blip3oNext.from_pretrained(tmp_path / x / "final").state_dict() for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    raw = Blip3oNext.from_pretrained(tmp_path / "a" / "checkpoint-0000004" / "model").state_dict()
    assert not torch.equal(raw["transformer.proj_out.weight"], a["transformer.proj_out.weight"])  # the final model is the EMA
    assert Blip3oNext.from_pretrained(tmp_path / "a" / "final").semantic


def test_cli_generates_and_scores_plans_with_a_semantic_model(semantic_model, tmp_path, capsys):
    semantic_model.save_pretrained(tmp_path / "m")
    out = tmp_path / "imgs" / "out.png"
    assert main(["generate", PROMPTS[0], "-o", str(out), "--show-blueprint", "--model", str(tmp_path / "m"), "--steps", "1"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.png", "out_blueprint.png"]
    report = tmp_path / "geneval.json"
    assert main(["eval", "geneval", "--model", str(tmp_path / "m"), "--per-category", "1", "--steps", "1", "--json", str(report),
                 "--grid", str(tmp_path / "grid.png")]) == 0
    assert "plan score" in capsys.readouterr().out
    summary = json.loads(report.read_text())["summary"]
    assert {c: v["n"] for c, v in summary["plan"]["categories"].items()} == {c: v["n"] for c, v in summary["categories"].items()}


def test_grpo_on_plan_rewards_trains_the_ar_side_and_renders_nothing(semantic_model, tmp_path, monkeypatch):
    """Plan rewards need no diffusion: one GRPO step samples blueprints only, changes only the AR model and its
    image embedding, and logs each plan reward and the hidden-state drift (0 while the policy is the reference)."""
    semantic_model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(Pipeline, "_render", lambda *a, **k: pytest.fail("plan-only rollouts must not render"))
    cfg = GRPOConfig(init_from=str(tmp_path / "m"), output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=2, num_generations=3,
                     lr=1e-2, eval_per_category=0, reward_weights={"strict": 0, "partial": 0, "ocr": 0, "plan": 1, "plan_partial": 1}, reader=True)
    out = train_grpo(cfg)
    before = Blip3oNext.from_pretrained(tmp_path / "m").state_dict()
    after = Blip3oNext.from_pretrained(out / "final").state_dict()
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"ar", "image_embedding"}
    # The reader is the starting AR side, frozen: the renderer still reads what it was trained on.
    for part in ("ar", "embedding"):
        start = {k: v for k, v in before.items() if k.split(".")[0] == {"ar": "ar", "embedding": "image_embedding"}[part]}
        assert all(torch.equal(after[f"reader_{part}." + k.split(".", 1)[1]], v) for k, v in start.items())
    with open(out / "metrics.csv") as f:
        (row,) = csv.DictReader(f)
    assert {"reward_plan", "reward_plan_partial"} <= set(row) and "reward_strict" not in row
    assert float(row["kl"]) == 0.0 and float(row["hidden_drift"]) == 0.0


def test_grpo_takes_reward_functions_as_named_callables(semantic_model, tmp_path, monkeypatch):
    """TRL's convention: `train_grpo(cfg, reward_funcs=[...])` scores rollouts with the given functions alone, logs
    each as reward_<name>, and renders nothing when none of them reads images."""
    semantic_model.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(Pipeline, "_render", lambda *a, **k: pytest.fail("rollouts scored on blueprints alone must not render"))
    seen = []

    def black_background(completions):
        seen.append(len(completions))
        return (completions.blueprints[:, 0] == DEFAULT_VOCAB.background_token("black")).astype(float)

    cfg = GRPOConfig(init_from=str(tmp_path / "m"), output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=2, num_generations=3,
                     lr=1e-2, eval_per_category=0)
    out = train_grpo(cfg, reward_funcs=[RewardFunction("black_background", black_background, reads="blueprints")])
    with open(out / "metrics.csv") as f:
        (row,) = csv.DictReader(f)
    assert seen == [6] and "reward_black_background" in row and not {"reward_strict", "reward_plan"} & set(row)
    assert float(row["reward"]) == pytest.approx(float(row["reward_black_background"]))  # a name cfg does not weigh weighs 1


def test_grpo_refuses_what_a_semantic_model_cannot_give(semantic_model, tmp_path):
    semantic_model.save_pretrained(tmp_path / "m")
    with pytest.raises(InputError, match="temperature 1"):
        train_grpo(GRPOConfig(init_from=str(tmp_path / "m"), output_dir=str(tmp_path / "run"), temperature=0.7, eval_per_category=0))


def test_grpo_moves_a_semantic_policy_toward_rewarded_tokens(semantic_model):
    """Reward = a black background (one of three): a few GRPO steps on exact semantic log-probs raise its
    probability at position 0, and the frozen reference keeps its own."""
    model = copy.deepcopy(semantic_model)
    policy = Policy(model.ar, model.image_embedding)
    reference = copy.deepcopy(policy).requires_grad_(False)
    cfg = GRPOConfig(num_generations=8, lr=3e-2, updates_per_batch=2, eval_per_category=0)
    params = list(policy.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    black = DEFAULT_VOCAB.background_token("black")
    ids, mask = model_inputs(model, 2 * cfg.num_generations)
    generator = torch.Generator().manual_seed(0)

    def black_mass(p: Policy) -> float:
        with torch.no_grad():
            hidden = forced_blueprint(p.ar, model.image_vocab, ids[:1], mask[:1], torch.full((1, 1), black), p.embedding).hidden_states
            return p.embedding.log_probs(hidden[:, :1], torch.tensor([[black]]), torch.zeros(1, 1, dtype=torch.long)).exp().item()

    start = black_mass(policy)
    for _ in range(6):
        codes = sample_blueprint(policy.ar, ids, mask, model.image_vocab, model.num_image_tokens, SamplingConfig(top_k=0, top_p=1.0), generator,
                                 embedding=policy.embedding).codes
        rollouts = Rollouts(items=[], input_ids=ids, attention_mask=mask, codes=codes, images=None)
        policy_update(policy, reference, model.image_vocab, rollouts, (codes[:, 0] == black).float(), optimizer, params, cfg)
    assert black_mass(policy) > start + 0.2 and black_mass(reference) == pytest.approx(start)


def model_inputs(model: Blip3oNext, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return Pipeline(model).tokenize([PROMPTS[0]] * n)


def test_a_reader_keeps_the_renderers_input_when_the_writer_moves(semantic_model, tmp_path):
    """With a reader, the renderer reads a blueprint through the frozen copy: moving the writer (as RL does) changes
    the blueprints it samples, not how a given blueprint is rendered; the reader is saved and loaded with the model."""
    model = copy.deepcopy(semantic_model)
    model.add_reader()
    pipe = Pipeline(model)
    codes = pipe.sample_blueprints(PROMPTS, seed=0)
    render = lambda p: np.stack([np.asarray(im) for im in p(PROMPTS, seed=0, blueprints=codes, num_inference_steps=2).images])  # noqa: E731
    before = render(pipe)
    with torch.no_grad():
        for param in model.ar.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    assert np.array_equal(render(pipe), before)
    moved = copy.deepcopy(semantic_model)
    moved.ar.load_state_dict(model.ar.state_dict())
    assert not np.array_equal(render(Pipeline(moved)), before)  # without the reader the same move changes the image
    model.save_pretrained(tmp_path / "m")
    loaded = Blip3oNext.from_pretrained(tmp_path / "m")
    assert loaded.reader_ar is not None and loaded.reader_embedding is not None
    assert np.array_equal(render(Pipeline(loaded)), before)


def test_training_conditions_the_renderer_on_the_reader(semantic_model):
    """With a reader, the flow-matching loss reads the reader's states: moving the writer changes the CE only."""
    model = copy.deepcopy(semantic_model)
    model.add_reader()
    inputs = batch(model)
    losses = lambda: model(*inputs, generator=torch.Generator().manual_seed(0))  # noqa: E731
    with torch.no_grad():
        before = losses()
        for param in model.ar.parameters():
            param.add_(torch.randn_like(param) * 0.05)
        after = losses()
    assert torch.equal(after.flow_matching_loss, before.flow_matching_loss) and not torch.equal(after.ce_loss, before.ce_loss)


def test_sample_categorical_draws_from_the_distribution_and_never_a_zero():
    torch.manual_seed(0)
    probs = torch.rand(3, 50) * (torch.rand(3, 50) > 0.5)
    probs = probs / probs.sum(-1, keepdim=True)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_categorical(probs, generator) for _ in range(20000)])
    for row in range(3):
        freq = torch.bincount(draws[:, row], minlength=50).float() / len(draws)
        assert (freq - probs[row]).abs().max() < 0.012 and not freq[probs[row] == 0].any()


def test_greedy_semantic_decoding_picks_the_most_probable_kind_then_its_most_probable_id():
    # ids 0-1: EMPTY and a background; ids 2-5: one shape at four offsets, 0.15 each (0.60 together) against EMPTY's
    # 0.30, so the kind is a shape although EMPTY is the single most probable id. An id that is not allowed (-inf)
    # counts for nothing: in row 2 only one offset of the shape is allowed, and EMPTY wins.
    kinds = torch.tensor([TokenKind.EMPTY, TokenKind.BACKGROUND, TokenKind.SHAPE, TokenKind.SHAPE, TokenKind.SHAPE, TokenKind.SHAPE])
    probs = torch.tensor([[0.30, 0.10, 0.15, 0.15, 0.16, 0.14], [0.70, 0.00, 0.10, 0.10, 0.05, 0.05], [0.30, 0.10, 0.15, 0.15, 0.16, 0.14]])
    log_probs = probs.log()
    log_probs[2, 3:] = -torch.inf
    assert kind_first_argmax(log_probs, kinds).tolist() == [4, 0, 0]
    assert log_probs.argmax(-1).tolist() == [0, 0, 0]  # the plain argmax over ids, which kept a cell EMPTY


def test_kind_first_sampling_keeps_the_odds_of_each_kind_and_cools_only_the_id_within_it():
    # EMPTY 0.40 against a shape at three offsets (0.30, 0.20, 0.10: 0.60 together). Cooled within its kind, the
    # shape is still written 60% of the time and its offsets go as p ** 2 (0.30 : 0.20 : 0.10 -> 9 : 4 : 1); one
    # draw over all ids at temperature 0.5 writes it less often than EMPTY (0.14 / 0.30 = 0.47).
    kinds = torch.tensor([TokenKind.EMPTY, TokenKind.SHAPE, TokenKind.SHAPE, TokenKind.SHAPE])
    log_probs = torch.tensor([[0.40, 0.30, 0.20, 0.10]]).log().expand(20000, 4)
    sampling = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, id_temperature=0.5)
    draws = kind_first_sample(log_probs, kinds, torch.zeros(20000, 1, dtype=torch.long), sampling, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert abs(freq[1:].sum() - 0.60) < 0.015
    assert torch.allclose(freq[1:] / freq[1:].sum(), torch.tensor([9.0, 4.0, 1.0]) / 14, atol=0.015)
    one_draw = (log_probs[0] / 0.5).softmax(-1)
    assert one_draw[1:].sum() < one_draw[0]
    greedy_id = kind_first_sample(log_probs, kinds, torch.zeros(20000, 1, dtype=torch.long), replace(sampling, id_temperature=0.0),
                                  torch.Generator().manual_seed(0))
    assert set(greedy_id.tolist()) == {0, 1}  # the kind still drawn, then the most probable offset
    with pytest.raises(ValueError, match="id_temperature"):
        SamplingConfig(id_temperature=-1.0)


def flat_distribution(log_probs: torch.Tensor, kinds: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """(B, ids) the probabilities with which the flat draw (`kind_first_sample`, or one draw at the temperature)
    picks each id from `log_probs` (B, ids), -inf where not allowed."""
    if sampling.id_temperature is None:
        return (log_probs / sampling.temperature).softmax(-1)
    kind = (kind_mass(log_probs, kinds).log() / sampling.temperature).softmax(-1)
    within = torch.stack([(log_probs.masked_fill(kinds != k, -torch.inf) / sampling.id_temperature).softmax(-1).nan_to_num()
                          for k in range(len(TokenKind))], 1)  # (B, kinds, ids)
    return (kind[..., None] * within).sum(1)


@pytest.mark.parametrize("sampling", [SamplingConfig(top_k=0, top_p=1.0, temperature=0.7), SamplingConfig(top_k=0, top_p=1.0, id_temperature=0.5),
                                      SamplingConfig(top_k=0, top_p=1.0, temperature=1.5, id_temperature=2.0)])
@torch.no_grad()
def test_the_level_by_level_draw_is_the_flat_draw_over_every_id(sampling):
    """`sample_hierarchy` draws kind, head and offset in turn; its ids come out as often as the flat draw over all
    49,311 allowed ids would draw them (per kind, head and offset, within sampling noise), with the same
    log-likelihoods, and greedily it picks the same ids."""
    torch.manual_seed(0)
    embedding, c, n = SemanticEmbedding(16, init_std=0.5), DEFAULT_VOCAB.config, 40000
    blank = [DEFAULT_VOCAB.background_token("white")] + [DEFAULT_VOCAB.empty_id] * c.n_cells
    first = list(blank)
    first[c.cell_positions[9]] = DEFAULT_VOCAB.shape_token("circle", "red", 12, 4, 4)  # the next cell's shapes must keep away
    for written in (torch.tensor([first[: c.cell_positions[10]]]), torch.tensor([blank[: c.cell_positions[2]]]), torch.tensor([blank[:0]])):
        hidden = torch.randn(1, 16).expand(n, -1)
        written = written.expand(n, -1)
        flat = embedding.full_log_probs(hidden[:1], written.shape[1]).masked_fill(~embedding.allowed(written[:1]), -torch.inf)
        want = flat_distribution(flat, embedding.kind_of, sampling)[0]
        ids, log_likelihood = sample_hierarchy(embedding.constrained_log_probs(hidden, written), embedding, sampling, torch.Generator().manual_seed(1))
        assert (want[ids] > 0).all()  # never an id the flat draw refuses
        assert torch.allclose(log_likelihood, flat.log_softmax(-1)[0, ids], atol=1e-4)
        flat_ids = torch.multinomial(want, n, replacement=True, generator=torch.Generator().manual_seed(2))  # the flat draw itself
        for level in (embedding.kind_of, embedding.head_of, embedding.id_slot):  # kind, head, offset (and its class)
            expected = torch.zeros(int(level.max()) + 1).index_add_(0, level, want)
            distance = lambda draws: (torch.bincount(level[draws], minlength=len(expected)) / n - expected).abs().sum() / 2  # noqa: E731
            assert distance(ids) < 1.3 * distance(flat_ids) + 0.005, level  # total variation, against the flat draw's own noise
    hidden, written = torch.randn(300, 16), torch.tensor([first[: c.cell_positions[10]]]).expand(300, -1)
    flat = embedding.full_log_probs(hidden, written.shape[1]).masked_fill(~embedding.allowed(written), -torch.inf)
    greedy, _ = sample_hierarchy(embedding.constrained_log_probs(hidden, written), embedding, replace(sampling, temperature=0.0), None)
    assert torch.equal(greedy, kind_first_argmax(flat, embedding.kind_of))


@pytest.mark.parametrize("field, value, neutral, bad", [("id_temperature", 0.0, 1.0, -0.5), ("best_of", 3, 1, 0)])
def test_a_sampling_setting_is_the_models_default_an_option_overrides_it_and_greedy_ignores_it(semantic_model, monkeypatch, field, value,
                                                                                              neutral, bad):
    """`id_temperature` (0: the most probable id of the drawn kind) and `best_of` (the most likely of 3): the model's
    config sets the default, an option overrides it, and greedy decoding writes the same blueprint whatever they are.
    `best_of`'s neutral value, 1, is also the test model's own, so overriding back writes its default blueprints."""
    pipe, prompts = Pipeline(semantic_model), ["a photo of two red circles above a blue star", "the word HI"]
    blueprints = lambda **options: pipe(prompts, seed=5, num_inference_steps=1, **options).blueprints  # noqa: E731
    default = blueprints()
    changed = blueprints(**{field: value})
    assert not torch.equal(default, changed)
    monkeypatch.setattr(semantic_model.config, field, value)
    assert torch.equal(blueprints(), changed)
    if field == "best_of":
        assert torch.equal(blueprints(best_of=neutral), default)
    assert torch.equal(blueprints(temperature=0.0), blueprints(temperature=0.0, **{field: neutral}))  # greedy throughout
    with pytest.raises(ValueError, match=field):
        SamplingConfig(**{field: bad})
    with pytest.raises(ValueError, match=field):
        type(semantic_model.config)(**{field: bad})


def test_best_of_keeps_each_prompts_most_likely_blueprint_and_its_states(semantic_model):
    model = semantic_model
    ids, mask = left_padded(model, PROMPTS)
    sampling = SamplingConfig(top_k=0, top_p=1.0, id_temperature=0.5)
    sample = lambda ids, mask, sampling: sample_blueprint(  # noqa: E731
        model.ar, ids, mask, model.image_vocab, model.num_image_tokens, sampling, torch.Generator().manual_seed(3), embedding=model.image_embedding)
    candidates = sample(ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0), sampling)
    best = sample(ids, mask, replace(sampling, best_of=4))
    scores = candidates.log_likelihood.view(2, 4)
    assert scores.std() > 0  # the four drafts differ, so the choice is a real one
    for i in range(2):
        assert torch.equal(best.codes[i], candidates.codes[4 * i + int(scores[i].argmax())])
        assert best.log_likelihood[i] == scores[i].max()
    forced = forced_blueprint(model.ar, model.image_vocab, ids, mask, best.codes, model.image_embedding)
    assert torch.allclose(forced.hidden_states, best.hidden_states, atol=1e-4)  # the states of the kept blueprint
    # The score is the codes' log-probability among the ids the sampler allowed at each position.
    with torch.no_grad():
        log_p = torch.stack([model.image_embedding.full_log_probs(forced.hidden_states[:, k], k) for k in range(best.codes.shape[1])], 1)
    allowed = torch.stack([model.image_embedding.allowed(best.codes[:, :k]) for k in range(best.codes.shape[1])], 1)
    expected = log_p.masked_fill(~allowed, -torch.inf).log_softmax(-1).gather(-1, best.codes[..., None]).sum((1, 2))
    assert torch.allclose(best.log_likelihood, expected, atol=1e-3)
