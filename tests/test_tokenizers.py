"""Text tokenizer (byte fallback, image vocabulary) and image tokenizer (shapes, codes, semantic labels)."""

import numpy as np
import pytest
import torch

from blip3o_next.models.image_tokenizer import (
    NUM_COLOR_CLASSES, NUM_SHAPE_CLASSES, ImageTokenizer, cell_labels, images_to_tensor, semantic_batch, tensor_to_images,
)
from blip3o_next.shapeworld.render import render
from blip3o_next.shapeworld.world import Scene, ShapeObject
from blip3o_next.models.text_tokenizer import IM_END, IM_START, extend_tokenizer, image_token, train_text_tokenizer
from transformers import PreTrainedTokenizerFast


@pytest.fixture(scope="module")
def text_tokenizer():
    corpus = ["a photo of two red circles above a blue star", "make the green cross bigger", 'a photo of the word "HI"'] * 50
    fast = PreTrainedTokenizerFast(tokenizer_object=train_text_tokenizer(corpus, vocab_size=400), pad_token="<pad>", eos_token="<eos>")
    return extend_tokenizer(fast, codebook_size=16)


def test_any_text_round_trips(text_tokenizer):
    tok, _ = text_tokenizer
    for text in ("a photo of a red circle", "unknown wörds, ünïcode 🦄 and 中文", "\t tabs  and  spaces "):
        assert tok.decode(tok(text)["input_ids"]) == text


def test_image_vocabulary_is_contiguous(text_tokenizer, tmp_path):
    tok, vocab = text_tokenizer
    assert tok.convert_tokens_to_ids(image_token(7)) == vocab.image_offset + 7 and vocab.vocab_end == len(tok)
    ids = tok(f"{IM_START}<S0>{image_token(3)}{image_token(15)}{IM_END}")["input_ids"]
    assert ids == [vocab.im_start, vocab.scales[0], vocab.image_offset + 3, vocab.image_offset + 15, vocab.im_end]
    tok.save_pretrained(tmp_path)
    again, vocab2 = extend_tokenizer(PreTrainedTokenizerFast.from_pretrained(tmp_path), 16)  # idempotent
    assert vocab2 == vocab and len(again) == len(tok)


def test_cell_labels_follow_the_scene():
    scene = Scene(64, "white", (ShapeObject("square", "red", 12.0, 12.0, 16.0),))
    colors, shapes = cell_labels(scene, 8)
    assert colors.shape == (8, 8) and colors[1, 1] == 1 and shapes[1, 1] == 1 + 1  # red, square
    assert colors[7, 7] == 0 and shapes[7, 7] == 0
    assert colors.max() < NUM_COLOR_CLASSES and shapes.max() < NUM_SHAPE_CLASSES


def test_image_tokenizer_shapes_and_determinism():
    torch.manual_seed(0)
    tok = ImageTokenizer(channels=(16, 16), code_dim=8, codebook_size=32)
    scenes = [Scene(64, "gray", (ShapeObject("circle", "blue", 30.0, 30.0, 18.0),))] * 2
    x = images_to_tensor(np.stack([render(s) for s in scenes]))
    out = tok(x, *semantic_batch(scenes, tok.grid))
    assert out.indices.shape == (2, 64) and out.reconstruction.shape == x.shape and out.loss.ndim == 0
    tok.eval()
    idx = tok.encode(x)
    assert torch.equal(idx, tok.encode(x)) and idx.max() < 32
    assert torch.allclose(tok.decoder(tok.codes_from_indices(idx)).clamp(-1, 1), tok.decode(idx))
    assert tensor_to_images(tok.decode(idx)).shape == (2, 64, 64, 3)
