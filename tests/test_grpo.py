"""GRPO: the verifier rewards on hand-made images, the objective's pieces, a toy run that provably moves the
policy toward higher-reward tokens, and one real step on the bundled model (only the AR part changes)."""

import csv
import json
import dataclasses
import logging

import numpy as np
import pytest
import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from blip3o_next.models.autoregressive import SamplingConfig, forced_blueprint, sample_blueprint
from blip3o_next.cli import main
from blip3o_next.training.grpo import Policy, group_advantages, grpo_loss, hidden_drift, policy_update, sample_rollouts, train_grpo
from blip3o_next.training.grpo_config import GRPOConfig
from blip3o_next.training.grpo_tasks import MixedItems, Rollouts, TextToImage, TrainingEdits, TrainingPrompts
from blip3o_next.models.modeling import Blip3oNext
from blip3o_next.pipeline import BUNDLED_MODELS, Pipeline
from blip3o_next.training.rewards import (
    DEFAULT_REWARD_WEIGHTS_BY_TASK, Completions, RewardFunction, Rewards, check_reward_weights, default_reward_funcs, weighted_rewards
)
from blip3o_next.models.semantic_blueprint import encode_scene
from blip3o_next.shapeworld.edits import edit_suite, sample_edit
from blip3o_next.shapeworld.prompts import canonical_suite, parse_prompt
from blip3o_next.shapeworld.render import render
from blip3o_next.shapeworld.sampler import sample_scene_for
from blip3o_next.models.text_tokenizer import ImageVocab

# ----------------------------------------------------------------------------- rewards


def _rewards(task: str, weights: dict, items: list, images=None, blueprints=None) -> Rewards:
    """The built-in rewards of `task` a run with `weights` computes, on one batch, as the trainer mixes them."""
    merged = check_reward_weights(weights, DEFAULT_REWARD_WEIGHTS_BY_TASK[task])
    return weighted_rewards(default_reward_funcs(task, merged), merged, Completions(items, images, blueprints))


def _scene_image(prompt: str, seed: int = 0) -> np.ndarray:
    return render(sample_scene_for(parse_prompt(prompt), np.random.default_rng(seed)))


def test_reward_on_hand_made_images():
    prompts = ["a photo of two red circles", "a photo of two red circles", "a photo of a blue star left of a green square", 'a photo of the word "CAT"']
    images = [
        _scene_image(prompts[0]),  # exactly right
        _scene_image("a photo of three red circles"),  # one circle too many: fails the strict check, partial credit
        _scene_image("a photo of a green square left of a blue star"),  # both objects, wrong relation
        _scene_image('a photo of the word "CAT"'),
    ]
    r = _rewards("t2i", {}, [parse_prompt(p) for p in prompts], images)
    assert r.parts["strict"].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert r.parts["partial"][0] == 1.0 and 0 < r.parts["partial"][1] < 1 and 0 < r.parts["partial"][2] < 1
    assert np.isnan(r.parts["ocr"][:3]).all() and r.parts["ocr"][3] == 1.0  # OCR applies to word prompts only
    assert r.total.tolist() == pytest.approx([2.0, r.parts["partial"][1], r.parts["partial"][2], 3.0])


def test_ocr_reward_gives_partial_credit_for_a_near_miss():
    r = _rewards("t2i", {"strict": 0.0, "partial": 0.0}, [parse_prompt('a photo of the word "CAT"')] * 2, [_scene_image('a photo of the word "CAR"'), _scene_image('a photo of a red circle')])
    assert r.parts["strict"].tolist() == [0.0, 0.0]
    assert r.parts["ocr"][0] == pytest.approx(2 / 3) and r.parts["ocr"][1] == 0.0
    assert r.total.tolist() == pytest.approx([2 / 3, 0.0])


def test_precision_reward_charges_each_extra_object_and_an_empty_canvas():
    asked = parse_prompt("a photo of two red circles")
    images = [_scene_image(f"a photo of {n} red circles") for n in ("two", "three", "four")]
    empty = np.full_like(images[0], 255)  # a blank white canvas: nothing drawn
    r = _rewards("t2i", {"strict": 0.0, "partial": 0.0, "ocr": 0.0, "precision": 1.0}, [asked] * 4, images + [empty])
    assert r.parts["precision"].tolist() == pytest.approx([1.0, 2 / 3, 2 / 4, 0.0])
    assert r.total.tolist() == pytest.approx([1.0, 2 / 3, 2 / 4, 0.0])
    assert DEFAULT_REWARD_WEIGHTS_BY_TASK["t2i"]["precision"] == 0.0  # off unless a config asks for it


def test_plan_rewards_on_hand_made_blueprints():
    """The plan rewards read a semantic blueprint as its scene: the right plan 1, one object of the wrong colour 0
    with partial credit; with only plan rewards weighed, no image is needed."""
    prompt = parse_prompt("a photo of a red circle and a blue star")
    scene = sample_scene_for(prompt, np.random.default_rng(0))
    wrong = dataclasses.replace(scene, objects=[dataclasses.replace(o, color="green" if o.shape == "star" else o.color) for o in scene.objects])
    plans_only = {"strict": 0.0, "partial": 0.0, "ocr": 0.0, "plan": 1.0, "plan_partial": 1.0}
    r = _rewards("t2i", plans_only, [prompt] * 2, None, np.array([encode_scene(scene), encode_scene(wrong)]))
    assert set(r.parts) == {"plan", "plan_partial"}
    assert r.parts["plan"].tolist() == [1.0, 0.0] and r.parts["plan_partial"][0] == 1.0 and 0 < r.parts["plan_partial"][1] < 1
    assert r.total.tolist() == pytest.approx([2.0, r.parts["plan_partial"][1]])
    with pytest.raises(ValueError, match="reads images, but this batch of 2 completions has none"):
        _rewards("t2i", {}, [prompt] * 2, None)  # image rewards weighed, no images given


def test_bad_reward_weights_are_rejected():
    with pytest.raises(ValueError, match="unknown reward"):
        GRPOConfig(reward_weights={"clip": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        GRPOConfig(reward_weights={"strict": -1.0})
    with pytest.raises(ValueError, match="unknown reward"):
        GRPOConfig(task="edit", reward_weights={"strict": 1.0})  # the edit rewards are success, partial and consistency


def test_edit_reward_on_hand_made_outputs():
    """The ground-truth target earns everything; the untouched source keeps its consistency but misses the edit
    (one object wrong, counted as one miss and one extra); a blank canvas earns little."""
    pair = sample_edit("recolor", np.random.default_rng(3))
    n = len(pair.source.objects)
    blank = np.full_like(render(pair.source), 128)
    r = _rewards("edit", {}, [pair] * 3, [render(pair.target), render(pair.source), blank])
    assert r.parts["success"].tolist() == [1.0, 0.0, 0.0]
    assert r.parts["partial"][:2].tolist() == pytest.approx([1.0, (n + 1) / (n + 3)]) and r.parts["partial"][2] < 0.5
    assert r.parts["consistency"][:2].tolist() == [1.0, 1.0] and r.parts["consistency"][2] == 0.0
    assert r.total.tolist() == pytest.approx([2.5, (n + 1) / (n + 3) + 0.5, r.parts["partial"][2]])


def test_edit_plan_rewards_on_hand_made_blueprints():
    """An edit blueprint that writes the target scene earns the plan rewards; one that copies the source misses the
    edit; a plan-only reward reads no image."""
    pair = sample_edit("move", np.random.default_rng(5))
    blueprints = np.array([encode_scene(pair.target), encode_scene(pair.source)])
    plans_only = {"success": 0.0, "partial": 0.0, "consistency": 0.0, "plan": 1.0, "plan_partial": 1.0}
    r = _rewards("edit", plans_only, [pair] * 2, None, blueprints)
    assert set(r.parts) == {"plan", "plan_partial"} and r.parts["plan"].tolist() == [1.0, 0.0]
    assert r.parts["plan_partial"][0] == 1.0 > r.parts["plan_partial"][1]
    assert r.total.tolist() == pytest.approx([2.0, r.parts["plan_partial"][1]])
    with pytest.raises(ValueError, match="2 completions but 1 blueprints"):
        _rewards("edit", plans_only, [pair] * 2, None, blueprints[:1])


# ----------------------------------------------------------------------------- objective


def test_group_advantages_are_normalised_per_group():
    a = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 0.5]), group_size=4)
    assert a[:4].mean().item() == pytest.approx(0.0, abs=1e-6) and a[0] > 0 > a[1]
    assert a[4:].tolist() == [0.0] * 4  # equal rewards: no signal


def test_kl_is_zero_when_policy_equals_reference():
    torch.manual_seed(0)
    logp = torch.randn(3, 5).log_softmax(-1)
    loss, stats = grpo_loss(logp, logp, logp, torch.zeros(3), epsilon=0.2, beta=1.0)
    assert stats["kl"] == 0.0 and loss.item() == 0.0
    _, stats = grpo_loss(logp, logp, logp - 0.1, torch.zeros(3), epsilon=0.2, beta=1.0)
    assert stats["kl"] > 0


def test_clipping_stops_the_gradient_beyond_epsilon():
    old = torch.zeros(1, 2)
    logp = torch.tensor([[0.5, 0.05]], requires_grad=True)  # ratios e^0.5 (outside 1.2) and e^0.05 (inside)
    loss, stats = grpo_loss(logp, old, logp.detach(), torch.tensor([1.0]), epsilon=0.2, beta=0.0)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 1] < 0 and stats["clip_fraction"] == 0.5


# ----------------------------------------------------------------------------- a toy policy


CODEBOOK, PROMPT_LEN, N_TOKENS = 16, 3, 6
VOCAB = ImageVocab(im_start=1, im_end=2, scales=(3, 4, 5), image_offset=8, codebook_size=CODEBOOK)


def _toy_policy() -> Qwen3ForCausalLM:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=VOCAB.vocab_end, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, max_position_embeddings=32, tie_word_embeddings=True)
    return Qwen3ForCausalLM(config).eval()


def _toy_prompts(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.full((n, PROMPT_LEN), 6), torch.ones(n, PROMPT_LEN, dtype=torch.long)


def token_logprobs(ar, *inputs) -> torch.Tensor:
    return Policy(ar, None).token_logprobs(*inputs)[0]


def _good_mass(policy) -> float:
    """Probability the policy gives the rewarded codes (0..3) as the blueprint's first token."""
    ids, mask = _toy_prompts(1)
    with torch.no_grad():
        return sum(token_logprobs(policy, VOCAB, ids, mask, torch.full((1, 1), c)).exp().item() for c in range(4))


def test_token_logprobs_line_up_with_the_sampler():
    policy = _toy_policy()
    ids, mask = _toy_prompts(2)
    bp = sample_blueprint(policy, ids, mask, VOCAB, N_TOKENS, SamplingConfig(temperature=0))
    logp = token_logprobs(policy, VOCAB, ids, mask, bp.codes)
    # Greedy codes are each position's most likely code, so their log-prob is the largest over the codebook.
    for pos in range(N_TOKENS):
        variants = bp.codes.repeat_interleave(CODEBOOK, 0)  # each row once with every code at `pos`
        variants[:, pos] = torch.arange(CODEBOOK).repeat(2)
        alternatives = token_logprobs(policy, VOCAB, ids.repeat_interleave(CODEBOOK, 0), mask.repeat_interleave(CODEBOOK, 0), variants)[:, pos]
        assert torch.allclose(logp[:, pos], alternatives.view(2, CODEBOOK).max(1).values, atol=1e-5)
        assert torch.allclose(alternatives.view(2, CODEBOOK).exp().sum(1), torch.ones(2), atol=1e-5)  # a distribution over the codebook


def test_a_teacher_forced_blueprint_matches_the_cached_sampler():
    policy = _toy_policy()
    ids, mask = _toy_prompts(2)
    ids[0, 0], mask[0, 0] = 0, 0  # one left-padded row
    bp = sample_blueprint(policy, ids, mask, VOCAB, N_TOKENS, SamplingConfig(top_k=0, top_p=1.0), torch.Generator().manual_seed(1))
    forced = forced_blueprint(policy, VOCAB, ids, mask, bp.codes)
    assert torch.equal(forced.codes, bp.codes)
    assert torch.allclose(forced.hidden_states, bp.hidden_states, atol=1e-5)
    assert torch.allclose(forced.prompt_hidden_states * mask[..., None], bp.prompt_hidden_states * mask[..., None], atol=1e-5)


def test_grpo_moves_a_toy_policy_toward_rewarded_tokens():
    """Reward = share of the blueprint's codes in 0..3 (a quarter of the codebook): a few GRPO steps must raise the
    probability the policy gives those codes, while the frozen reference keeps its own."""
    policy = Policy(_toy_policy(), None)
    reference = Policy(_toy_policy(), None)
    cfg = GRPOConfig(num_generations=8, lr=3e-3, beta=0.001, updates_per_batch=2, eval_per_category=0)
    params = list(policy.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    ids, mask = _toy_prompts(4 * cfg.num_generations)

    def good_share(codes: torch.Tensor) -> torch.Tensor:
        return (codes < 4).float().mean(1)

    shares = []
    for _ in range(8):
        codes = sample_blueprint(policy.ar, ids, mask, VOCAB, N_TOKENS, SamplingConfig(top_k=0, top_p=1.0), generator).codes
        shares.append(good_share(codes).mean().item())
        rollouts = Rollouts(items=[], input_ids=ids, attention_mask=mask, codes=codes, images=[])
        stats = policy_update(policy, reference, VOCAB, rollouts, good_share(codes), optimizer, params, cfg)
    assert shares[0] < 0.4 and np.mean(shares[-2:]) > shares[0] + 0.2, shares
    assert stats["kl"] > 0 and stats["hidden_drift"] > 0
    assert _good_mass(policy.ar) > _good_mass(reference.ar) + 0.2


# ----------------------------------------------------------------------------- prompts and the real loop


def test_training_prompts_never_include_the_heldout_suite():
    cfg = GRPOConfig(heldout_per_category=50, eval_per_category=0)
    prompts = TrainingPrompts(cfg)
    heldout = {p.text for p in canonical_suite(50, seed=0)}
    drawn = [p for step in range(20) for p in prompts.draw(step, 8)]
    assert not {p.text for p in drawn} & heldout
    # The suite holds every single-object, two-object, counting and colours prompt, so those get none.
    assert set(prompts.categories) == {"position", "color_attr", "text", "dense", "composition"}
    compositions = [p for p in drawn if p.category == "composition"]
    assert compositions and all(parse_prompt(p.text) == p.requirement for p in compositions)
    assert [p.text for p in prompts.draw(3, 8)] == [p.text for p in TrainingPrompts(cfg).draw(3, 8)]  # same on resume


def test_rollouts_of_a_prompt_share_their_starting_noise():
    """With shared noise, two rollouts with the same blueprint (near-greedy sampling) give the same image;
    without it they differ."""
    pipe = Pipeline.from_pretrained("tiny")
    prompt = canonical_suite(1, seed=0, categories=["two_object"])
    images = {}
    for shared in (True, False):
        cfg = GRPOConfig(num_generations=2, temperature=1e-4, num_inference_steps=2, shared_noise=shared, eval_per_category=0)
        rollouts = sample_rollouts(pipe, TextToImage(cfg), prompt, cfg, torch.Generator().manual_seed(0))
        assert torch.equal(rollouts.codes[0], rollouts.codes[1])
        images[shared] = rollouts.images
    assert np.array_equal(*images[True]) and not np.array_equal(*images[False])


def test_one_grpo_step_on_the_bundled_model_changes_only_the_policy(tmp_path):
    """The bundled `tiny` writes semantic blueprints: its policy is the AR model and its image embedding."""
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=2, num_generations=3, num_inference_steps=2,
                     lr=1e-3, eval_per_category=0, checkpoint_every=1)
    out = train_grpo(cfg)
    before = Blip3oNext.from_pretrained(BUNDLED_MODELS["tiny"], torch_dtype=torch.float32).state_dict()
    after = Blip3oNext.from_pretrained(out / "final", torch_dtype=torch.float32).state_dict()
    changed = {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"ar", "image_embedding"}
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 2 and "reward_strict" in rows[0]
    assert any(f"reward_{c}" in rows[0] for c in ("position", "color_attr", "text", "dense", "composition"))  # per category too
    first = dict(zip(rows[0].split(","), rows[1].split(",")))
    assert float(first["kl"]) == 0.0  # the one update starts from the reference itself
    assert (out / "reward_curves.png").is_file() and (out / "checkpoint-0000001" / "trainer_state.json").is_file()


def _metrics(out) -> list[dict]:
    with open(out / "metrics.csv") as f:
        return list(csv.DictReader(f))


def test_grpo_resumes_from_its_last_checkpoint(tmp_path, caplog):
    """A run extended by more steps resumes where it stopped (same optimizer, prompts drawn by step), not anew."""
    cfg = GRPOConfig(output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=1, num_generations=2, num_inference_steps=1,
                     lr=1e-3, eval_per_category=0, checkpoint_every=1)
    (first,) = _metrics(train_grpo(cfg))
    with caplog.at_level(logging.INFO, logger="blip3o_next.training.grpo"):
        out = train_grpo(dataclasses.replace(cfg, steps=2))
    assert "resumed from" in caplog.text and "(step 1)" in caplog.text
    rows = _metrics(out)
    assert [r["step"] for r in rows] == ["1", "2"] and {k: rows[0][k] for k in first} == first  # step 1 kept, not redone
    assert (out / "checkpoint-0000002").is_dir()


def test_grpo_cli_rejects_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: grpo\nnum_generations: 1\n")
    assert main(["train", "grpo", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_generations" in err
    bad.write_text("stage: grpo\nreward_weights: {clip: 1}\n")
    assert main(["train", "--config", str(bad)]) == 2  # `stage: grpo` alone picks the GRPO trainer
    assert "unknown reward" in capsys.readouterr().err
    out = tmp_path / "run"
    bad.write_text("stage: grpo\n")
    assert main(["train", "grpo", "--config", str(bad), "--init-from", str(tmp_path / "nothing"), "--output-dir", str(out)]) == 2
    assert "nothing/blip3o_config.json: missing" in capsys.readouterr().err and not (out / "final").exists()
    bad.write_text("stages: [a.yaml]\n")
    assert main(["train", "--config", str(bad), "--init-from", "tiny"]) == 2 and "not to a recipe" in capsys.readouterr().err


# ----------------------------------------------------------------------------- GRPO on editing


def test_training_edits_never_include_the_heldout_suite():
    cfg = GRPOConfig(task="edit", heldout_per_category=30, eval_per_category=0)
    edits = TrainingEdits(cfg)
    key = lambda p: (p.instruction, p.source)  # noqa: E731
    heldout = {key(p) for p in edit_suite(30, seed=0)}
    drawn = [p for step in range(10) for p in edits.draw(step, 9)]
    assert not {key(p) for p in drawn} & heldout
    assert {p.spec.category for p in drawn} == set(edits.categories) and len(edits.categories) == 9
    assert [p.instruction for p in edits.draw(3, 9)] == [p.instruction for p in TrainingEdits(cfg).draw(3, 9)]  # same on resume


def test_edit_grpo_needs_an_edit_model_and_edit_settings(tmp_path, base_dir):
    with pytest.raises(ValueError, match="edit_category_weights: unknown categories dense"):
        GRPOConfig(task="edit", edit_category_weights={"dense": 1.0})
    with pytest.raises(ValueError, match="task edit draws no text-to-image prompts, so it takes no category_weights"):
        GRPOConfig(task="edit", category_weights={"dense": 1.0})
    with pytest.raises(ValueError, match="task must be one of"):
        GRPOConfig(task="inpaint")
    with pytest.raises(ValueError, match="trained to edit"):
        train_grpo(GRPOConfig(task="edit", init_from=str(base_dir), output_dir=str(tmp_path), eval_per_category=0))


def test_one_edit_grpo_step_on_the_bundled_model_changes_only_its_ar_side(tmp_path):
    """GRPO on editing with rendered rewards tunes the AR model and its image embedding alone; the renderer (connectors,
    diffusion, VAE) and the tokenizers stay as they were. With a one-pair-per-category evaluation, the before/after
    table and grid are written too."""
    cfg = GRPOConfig(task="edit", init_from="tiny", output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=2, num_generations=3,
                     num_inference_steps=2, lr=1e-3, eval_per_category=1, checkpoint_every=1)
    out = train_grpo(cfg)
    before = Blip3oNext.from_pretrained(BUNDLED_MODELS["tiny"], torch_dtype=torch.float32).state_dict()
    after = Blip3oNext.from_pretrained(out / "final", torch_dtype=torch.float32).state_dict()
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"ar", "image_embedding"}
    (row,) = _metrics(out)
    assert {"reward_success", "reward_partial", "reward_consistency"} <= set(row) and float(row["kl"]) == 0.0
    table = (out / "before_after.md").read_text()
    assert "| keep (partial) | 1 |" in table and "**overall success**" in table
    assert (out / "before_after.png").is_file() and json.loads((out / "eval_after.json").read_text())["n"] == 9


def test_reward_functions_are_mixed_by_name_and_checked():
    """weighted_rewards: each function's values under its name, the total weighted by name (1 for a name the
    weights do not hold); duplicate names and a wrong number of values are errors naming the function."""
    batch = Completions([parse_prompt("a photo of a red circle")] * 3)
    ones = RewardFunction("ones", lambda c: [1.0] * len(c))
    ramp = RewardFunction("ramp", lambda c: [0.0, 0.5, np.nan])
    r = weighted_rewards([ones, ramp], {"ramp": 2.0}, batch)
    assert r.parts["ramp"][:2].tolist() == [0.0, 0.5] and r.total.tolist() == pytest.approx([1.0, 2.0, 1.0])  # NaN counts 0
    assert r.means() == pytest.approx({"ones": 1.0, "ramp": 0.25})
    with pytest.raises(ValueError, match="unique"):
        weighted_rewards([ones, ones], {}, batch)
    with pytest.raises(ValueError, match="reward short gave values of shape"):
        weighted_rewards([RewardFunction("short", lambda c: [1.0])], {}, batch)


# ----------------------------------------------------------------------------- both at once (task mixed)


def test_plan_rewards_score_each_item_as_what_it_is():
    """One batch of a text-to-image prompt and an edit pair: the plan rewards check the prompt's blueprint against the
    prompt and the edit's against its pair, so the right plans earn 1 and a copied source misses the edit."""
    prompt = parse_prompt("a photo of a red circle and a blue star")
    pair = sample_edit("move", np.random.default_rng(5))
    scene = sample_scene_for(prompt, np.random.default_rng(0))
    blueprints = np.array([encode_scene(scene), encode_scene(pair.target), encode_scene(pair.source)])
    r = _rewards("mixed", {}, [prompt, pair, pair], None, blueprints)
    assert set(r.parts) == {"plan", "plan_partial"}  # task mixed weighs the plan rewards alone, and reads no image
    assert r.parts["plan"].tolist() == [1.0, 1.0, 0.0] and r.parts["plan_partial"][2] < 1.0
    with pytest.raises(ValueError, match="unknown reward"):
        GRPOConfig(task="mixed", reward_weights={"strict": 1.0})


def test_mixed_steps_hold_prompts_and_edit_pairs_in_the_asked_share():
    cfg = GRPOConfig(task="mixed", prompts_per_step=8, edit_fraction=0.75, edit_category_weights={"add": 1.0, "move": 1.0}, eval_per_category=0)
    assert cfg.prompts_per_task == {"t2i": 2, "edit": 6}
    items = MixedItems(cfg)
    assert "edit_add" in items.categories and "position" in items.categories
    drawn = items.draw(4, 8)
    assert [type(x).__name__ for x in drawn] == ["Prompt"] * 2 + ["EditPair"] * 6
    assert {p.spec.category for p in drawn[2:]} <= {"add", "move"}
    assert [str(x) for x in drawn] == [str(x) for x in MixedItems(cfg).draw(4, 8)]  # same on resume
    with pytest.raises(ValueError, match="both kinds of prompt in every step"):
        GRPOConfig(task="mixed", prompts_per_step=2, edit_fraction=0.9)
    with pytest.raises(ValueError, match="task t2i draws no edit pairs"):
        GRPOConfig(edit_category_weights={"add": 1.0})


def test_one_mixed_grpo_step_on_the_bundled_model_tunes_its_ar_side_on_both_tasks(tmp_path, base_dir):
    """Task mixed samples both kinds of blueprint in one step, renders nothing, logs each category under its task,
    and tunes the AR side alone; a VQ model (no plans to score) is refused."""
    cfg = GRPOConfig(task="mixed", init_from="tiny", output_dir=str(tmp_path / "run"), steps=1, prompts_per_step=2, num_generations=3,
                     lr=1e-3, eval_per_category=0, checkpoint_every=1)
    out = train_grpo(cfg)
    before = Blip3oNext.from_pretrained(BUNDLED_MODELS["tiny"], torch_dtype=torch.float32).state_dict()
    after = Blip3oNext.from_pretrained(out / "final", torch_dtype=torch.float32).state_dict()
    assert {k.split(".")[0] for k in before if not torch.equal(before[k], after[k])} == {"ar", "image_embedding"}
    (row,) = _metrics(out)
    assert {"reward_plan", "reward_plan_partial"} <= set(row) and not {"reward_strict", "reward_success"} & set(row)
    assert any(k.startswith("reward_edit_") for k in row) and float(row["kl"]) == 0.0
    with pytest.raises(ValueError, match="task mixed needs a model trained to edit"):
        train_grpo(dataclasses.replace(cfg, init_from=str(base_dir), output_dir=str(tmp_path / "vq")))


def test_a_mixed_batch_is_read_without_the_padding_of_its_longer_prompts():
    """Rollouts of a mixed step: the prompts' and the edits' blueprints in one left-padded batch. The policy reads each
    run of equally long prompts with its padding cut off, and gets the states that one padded pass gives."""
    from blip3o_next.training.grpo import prompt_runs
    from blip3o_next.training.grpo_tasks import Mixed

    pipe = Pipeline.from_pretrained("tiny")
    model = pipe.model
    cfg = GRPOConfig(task="mixed", prompts_per_step=2, num_generations=2, eval_per_category=0)
    task = Mixed(cfg)
    items = [item for item in task.training.draw(0, 2) for _ in range(2)]
    ids, mask, codes = task.plans(pipe, items, SamplingConfig(temperature=1.0, top_k=0, top_p=1.0), torch.Generator().manual_seed(0))
    lengths = mask.sum(1).tolist()
    assert lengths[0] == lengths[1] < lengths[2] == lengths[3] == ids.shape[1]  # the prompt's rows padded to the edit's length
    assert prompt_runs(mask) == [slice(0, 2), slice(2, 4)]
    with torch.no_grad():
        logp, hidden = Policy(model.ar, model.image_embedding).token_logprobs(model.image_vocab, ids, mask, codes)
        padded = forced_blueprint(model.ar, model.image_vocab, ids, mask, codes, model.image_embedding).hidden_states
    torch.testing.assert_close(hidden, padded, atol=1e-4, rtol=1e-4)
    assert logp.shape == codes.shape and torch.isfinite(logp).all()
