from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedTokenizerFast

from blip3o_next.models.autoregressive import build_sequences
from blip3o_next.models.image_tokenizer import images_to_tensor
from blip3o_next.models.modeling import Blip3oNext
from blip3o_next.models.presets import build_model, tiny_parts_configs
from blip3o_next.models.semantic_encoder import SemanticEncoder
from blip3o_next.shapeworld.dataset import t2i_samples
from blip3o_next.models.text_tokenizer import train_text_tokenizer
from blip3o_next.training.config import TrainConfig
from blip3o_next.models.vae import encode_latents


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def small_configs(vocab_size: int, semantic: bool = False) -> dict:
    """A much smaller tiny preset: every part at toy width, for fast tests (`semantic`: with a semantic blueprint)."""
    cfg = tiny_parts_configs(vocab_size, codebook_size=32, semantic=semantic)
    cfg["image_tokenizer"].update(channels=(16, 16), code_dim=8)
    cfg["ar"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    cfg["connector"].update(hidden_size=32, width=24)
    cfg["transformer"].update(num_layers=1, num_attention_heads=2, attention_head_dim=8, num_cross_attention_heads=2,
                              cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=24)
    return cfg


@pytest.fixture(scope="session")
def model_and_batch():
    """A tiny random model and one training batch (sequences, labels, latents)."""
    corpus = ["a photo of two red circles above a blue star", "make the green cross bigger"] * 30
    tok = PreTrainedTokenizerFast(tokenizer_object=train_text_tokenizer(corpus, vocab_size=300), pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    model = build_model(tok, small_configs(vocab_size=300 + 5 + 32))
    samples = list(islice(t2i_samples(0, 64), 2))
    images = images_to_tensor(np.stack([s["image"] for s in samples]))
    codes = model.image_tokenizer.encode(images)
    ids, mask, labels = build_sequences(model.tokenizer, model.image_vocab, ["a photo of a red circle", "a star"], codes, 32)
    with torch.no_grad():
        latents = encode_latents(model.vae, images)
    return model.eval(), (ids, mask, labels, latents)


@pytest.fixture(scope="module")
def base_dir(model_and_batch, tmp_path_factory) -> Path:
    """The tiny model saved as the folder an SFT stage starts from."""
    path = tmp_path_factory.mktemp("base") / "model"
    model_and_batch[0].save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def semantic_model() -> Blip3oNext:
    """A toy model with a semantic blueprint, its encoder random (it reads images into valid blueprints all the same)."""
    corpus = ["a photo of two red circles above a blue star", "the word HI", "make the green cross bigger"] * 30
    tok = PreTrainedTokenizerFast(tokenizer_object=train_text_tokenizer(corpus, vocab_size=300), pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    encoder = SemanticEncoder(channels=(8, 8, 8, 8), width=16, layers=1, attention_heads=2)
    return build_model(tok, small_configs(0, semantic=True), image_tokenizer=encoder).eval()


@pytest.fixture(scope="module")
def parts_dirs(model_and_batch, tmp_path_factory):
    """The frozen parts a pretrain stage starts from, saved as the earlier stages would."""
    model = model_and_batch[0]
    root = tmp_path_factory.mktemp("parts")
    model.tokenizer.save_pretrained(root / "text_tokenizer")
    model.image_tokenizer.save_pretrained(root / "image_tokenizer")
    model.vae.save_pretrained(root / "vae")
    overrides = {k: v for k, v in small_configs(0).items() if k in ("ar", "connector", "transformer")}
    overrides["ar"].pop("vocab_size")
    return root, overrides


def pretrain_config(parts_dirs, out: Path, **kw) -> TrainConfig:
    root, overrides = parts_dirs
    base = dict(stage="pretrain", output_dir=str(out), steps=4, batch_size=2, lr=3e-3, warmup_steps=1, checkpoint_every=2,
                log_every=1, text_tokenizer_dir=str(root / "text_tokenizer"), image_tokenizer_dir=str(root / "image_tokenizer"),
                vae_dir=str(root / "vae"), parts=overrides)
    return TrainConfig(**{**base, **kw})


def final_state(out: Path) -> dict[str, torch.Tensor]:
    return Blip3oNext.from_pretrained(out / "final").state_dict()
