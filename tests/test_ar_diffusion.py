"""AR blueprint sampler (KV cache, hidden states in the same pass) and flow-matching diffusion."""

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from transformers import Qwen3Config, Qwen3ForCausalLM

from blip3o_next.models.autoregressive import (
    SamplingConfig, cache_length, image_span_prefix, position_ids_from_mask, sample_blueprint,
)
from blip3o_next.models.connector import RMSNORM_INIT, Connector
from blip3o_next.models.diffusion import Condition, drop_condition, flow_matching_loss, noisy_latents, sample_latents
from blip3o_next.pipeline import unchanged_cells
from blip3o_next.models.text_tokenizer import ImageVocab

VOCAB = ImageVocab(im_start=100, im_end=101, scales=(102, 103, 104), image_offset=105, codebook_size=64)


@pytest.fixture(scope="module")
def ar():
    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=169, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=128)
    return Qwen3ForCausalLM(cfg).eval()


PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
MASK = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])


def test_sampling_is_seeded(ar):
    a = sample_blueprint(ar, PROMPTS, MASK, VOCAB, 12, SamplingConfig(top_k=20), torch.Generator().manual_seed(3))
    b = sample_blueprint(ar, PROMPTS, MASK, VOCAB, 12, SamplingConfig(top_k=20), torch.Generator().manual_seed(3))
    c = sample_blueprint(ar, PROMPTS, MASK, VOCAB, 12, SamplingConfig(top_k=20), torch.Generator().manual_seed(4))
    assert torch.equal(a.codes, b.codes) and not torch.equal(a.codes, c.codes)
    assert a.codes.shape == (2, 12) and int(a.codes.max()) < VOCAB.codebook_size and a.hidden_states.shape == (2, 13, 64)


def test_generation_hidden_states_equal_a_full_forward(ar):
    bp = sample_blueprint(ar, PROMPTS, MASK, VOCAB, 16, SamplingConfig(), torch.Generator().manual_seed(0))
    ids, mask = image_span_prefix(PROMPTS, MASK, VOCAB)
    ids = torch.cat([ids, bp.codes + VOCAB.image_offset], 1)
    mask = torch.cat([mask, torch.ones_like(bp.codes)], 1)
    with torch.no_grad():
        full = ar.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
    assert (full[:, -17:] - bp.hidden_states).abs().max().item() < 1e-4


def test_decoding_steps_share_one_shape(ar):
    """Every per-token step gets the same input shapes (so a compiled decoder compiles once), and a custom
    decoder changes nothing."""
    shapes = []

    def recording_decoder(**inputs):
        shapes.append(tuple(tuple(inputs[k].shape) for k in ("input_ids", "attention_mask", "position_ids", "cache_position")))
        return ar.model(**inputs)

    a = sample_blueprint(ar, PROMPTS, MASK, VOCAB, 12, SamplingConfig(top_k=20), torch.Generator().manual_seed(3), recording_decoder)
    b = sample_blueprint(ar, PROMPTS, MASK, VOCAB, 12, SamplingConfig(top_k=20), torch.Generator().manual_seed(3))
    assert len(shapes) == 12 and len(set(shapes)) == 1 and shapes[0][1] == (2, 1, 1, cache_length(PROMPTS.shape[1] + 2 + 12))  # a 4-D mask
    assert torch.equal(a.codes, b.codes) and torch.equal(a.hidden_states, b.hidden_states)
    assert (cache_length(1), cache_length(64), cache_length(65)) == (64, 64, 128)


def test_greedy_and_bad_settings(ar):
    a = sample_blueprint(ar, PROMPTS, MASK, VOCAB, 4, SamplingConfig(temperature=0))
    assert torch.equal(a.codes, sample_blueprint(ar, PROMPTS, MASK, VOCAB, 4, SamplingConfig(temperature=0)).codes)
    with pytest.raises(ValueError):
        SamplingConfig(top_p=0)


def test_connector_shapes_and_norm_init():
    c = Connector(64, 32)
    assert c(torch.randn(2, 5, 64)).shape == (2, 5, 32)
    assert torch.allclose(c.norm.weight, torch.full((32,), RMSNORM_INIT))


def test_connector_spatial_map_puts_each_token_on_its_cell():
    c = Connector(8, 16, spatial_channels=3)
    hidden = torch.randn(2, 4, 8)  # a 2x2 token grid, raster order
    m = c.spatial_map(hidden, side=4)
    assert m.shape == (2, 3, 4, 4)
    top_right = c.spatial_proj(hidden[:, 1])  # token 1 = row 0, column 1 -> latent rows 0-1, columns 2-3
    assert torch.allclose(m[:, :, 0, 3], top_right) and torch.allclose(m[:, :, 1, 2], top_right)
    with pytest.raises(ValueError, match="square grid"):
        c.spatial_map(torch.randn(1, 3, 8), side=4)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
                                  num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
                                  caption_channels=24, sample_size=8, patch_size=1)


def test_flow_matching_noising_and_dropout():
    x0, noise = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    xt = noisy_latents(x0, noise, torch.tensor([0.0, 1.0]))
    assert xt[0].abs().max() == 0 and torch.all(xt[1] == 1)
    cond = Condition(torch.ones(1000, 3, 5), spatial=torch.ones(1000, 2, 4, 4))
    dropped = drop_condition(cond, 0.1, torch.Generator().manual_seed(0))
    zero_tokens, zero_maps = (dropped.tokens.flatten(1).sum(1) == 0), (dropped.spatial.flatten(1).sum(1) == 0)
    assert 0.07 < zero_tokens.float().mean().item() < 0.13 and torch.equal(zero_tokens, zero_maps)
    # the unconditional CFG branch is exactly what dropout shows in training: the all-zero condition
    both = cond.with_unconditional()
    assert both.tokens[:1000].abs().sum() == 0 and both.spatial[:1000].abs().sum() == 0 and torch.equal(both.tokens[1000:], cond.tokens)


def test_flow_matching_overfits_one_batch(dit):
    latents, cond = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(1)), Condition(torch.randn(4, 6, 24))

    def held_out_loss() -> float:  # the same noise levels and noise every time
        with torch.no_grad():
            return flow_matching_loss(dit, latents, cond, generator=torch.Generator().manual_seed(99)).item()

    before = held_out_loss()
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        loss = flow_matching_loss(dit, latents, cond, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out_loss() < 0.5 * before


def test_cfg_sampling_is_seeded(dit):
    cfg = FlowMatchEulerDiscreteScheduler().config
    cond = Condition(torch.randn(2, 6, 24))
    a = sample_latents(dit, cfg, cond, (4, 8, 8), num_steps=4, generator=torch.Generator().manual_seed(5))
    b = sample_latents(dit, cfg, cond, (4, 8, 8), num_steps=4, generator=torch.Generator().manual_seed(5))
    assert a.shape == (2, 4, 8, 8) and torch.equal(a, b)


def test_known_cells_end_at_the_clean_latents_and_the_rest_is_sampled(dit):
    """Blended sampling (edits that keep the unchanged cells): known cells end exactly at the clean latents, and an
    all-unknown mask changes nothing."""
    cfg = FlowMatchEulerDiscreteScheduler().config
    cond = Condition(torch.randn(2, 6, 24))
    clean = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :4] = 1.0  # the top half is known
    free = sample_latents(dit, cfg, cond, (4, 8, 8), num_steps=4, generator=torch.Generator().manual_seed(5))
    out = sample_latents(dit, cfg, cond, (4, 8, 8), num_steps=4, generator=torch.Generator().manual_seed(5), known=(clean, mask))
    assert torch.allclose(out[:, :, :4], clean[:, :, :4], atol=1e-6)
    assert not torch.allclose(out[:, :, 4:], clean[:, :, 4:], atol=1e-2)
    unknown = sample_latents(dit, cfg, cond, (4, 8, 8), num_steps=4, generator=torch.Generator().manual_seed(5), known=(clean, 0 * mask))
    assert torch.equal(unknown, free)


def test_unchanged_cells_marks_the_kept_tokens_at_latent_size():
    reference = torch.arange(16).view(1, 16)  # a 4 x 4 token grid
    codes = reference.clone()
    codes[0, 5] = 99  # cell (1, 1) changed
    exact = unchanged_cells(codes, reference, 0, (8, 8))
    assert exact.shape == (1, 1, 8, 8) and exact.sum() == 64 - 4 and exact[0, 0, 2:4, 2:4].eq(0).all()
    widened = unchanged_cells(codes, reference, 1, (8, 8))
    assert widened.sum() == 64 - 36 and widened[0, 0, :6, :6].eq(0).all()
    assert unchanged_cells(reference, reference, 1, (8, 8)).eq(1).all()
