"""Generation end to end with a tiny random model: determinism, outputs, prompt truncation, bad input."""

import copy
import logging
import shutil

import numpy as np
import pytest
import torch

from blip3o_next.models.autoregressive import SamplingConfig
from blip3o_next.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(model_and_batch):
    return Pipeline(model_and_batch[0])


def test_generation_is_seeded(pipe):
    a = pipe(["a photo of a red circle", "a star"], seed=3, num_inference_steps=3)
    b = pipe(["a photo of a red circle", "a star"], seed=3, num_inference_steps=3)
    c = pipe(["a photo of a red circle", "a star"], seed=4, num_inference_steps=3)
    assert len(a.images) == 2 and a.images[0].size == (64, 64) and a.blueprint_previews[0].size == (64, 64)
    assert torch.equal(a.blueprints, b.blueprints) and np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))
    assert not torch.equal(a.blueprints, c.blueprints)


def test_given_blueprints_render_as_if_they_had_been_sampled(pipe):
    """`blueprints=` teacher-forces the codes: with the same starting noise, the sampled blueprint gives back the
    sampled images, and another blueprint gives other images."""
    prompts = ["a photo of a red circle", "two blue stars"]
    noise = torch.randn((2, *pipe.model.latent_shape), generator=torch.Generator().manual_seed(5))
    sampled = pipe(prompts, seed=3, num_inference_steps=2, latents=noise)
    forced = pipe(prompts, num_inference_steps=2, latents=noise, blueprints=sampled.blueprints)
    other = pipe(prompts, num_inference_steps=2, latents=noise, blueprints=sampled.blueprints.flip(0))
    assert torch.equal(forced.blueprints, sampled.blueprints)
    assert max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() for x, y in zip(sampled.images, forced.images)) <= 1
    assert np.abs(np.asarray(other.images[0], int) - np.asarray(sampled.images[0], int)).max() > 8


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_pipeline_gives_the_same_images(pipe):
    compiled = Pipeline(pipe.model, compile_transformer=True, compile_ar=True)
    prompts = ["a photo of a red circle", "two blue stars"]
    a, b = pipe(prompts, seed=1, num_inference_steps=2), compiled(prompts, seed=1, num_inference_steps=2)
    assert torch.equal(a.blueprints, b.blueprints)
    assert max(np.abs(np.asarray(x, int) - np.asarray(y, int)).max() for x, y in zip(a.images, b.images)) <= 1


def test_bfloat16_pipeline_is_seeded(pipe):
    bf16 = Pipeline(copy.deepcopy(pipe.model).to(torch.bfloat16))
    a, b = (bf16(["a photo of a red circle"], seed=2, num_inference_steps=2) for _ in range(2))
    assert a.images[0].size == (64, 64) and np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        out = pipe("a red circle " * 2000, seed=0, num_inference_steps=2, sampling=SamplingConfig(temperature=0))
    assert len(out.images) == 1 and "truncated" in caplog.text


def test_bad_input(pipe):
    for bad in ("", "   ", []):
        with pytest.raises(ValueError):
            pipe(bad)
    with pytest.raises(ValueError):
        pipe("a star", num_inference_steps=0)
    n, codebook = pipe.model.num_image_tokens, pipe.model.image_vocab.codebook_size
    for blueprints, message in ((torch.zeros(2, n, dtype=torch.long), "shape"), (torch.zeros(1, n), "integer"), (torch.full((1, n), codebook), "lie in")):
        with pytest.raises(ValueError, match=message):
            pipe("a star", blueprints=blueprints)
