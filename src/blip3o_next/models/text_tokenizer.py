"""The text tokenizer: byte-level BPE trained on data-engine text (any input is representable, byte by byte),
extended with `<im_start>`, `<im_end>`, scale tokens `<S0>..<S2>` and one token per image-codebook entry.

A pretrained backbone (Qwen3) brings its own tokenizer; `extend_tokenizer` adds the same tokens to it.
Image tokens get consecutive ids, so code k is token `image_offset + k` (see `ImageVocab`).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from typing import Iterable, Iterator

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD, EOS = "<pad>", "<eos>"
IM_START, IM_END = "<im_start>", "<im_end>"
NUM_SCALE_TOKENS = 3


def scale_token(i: int) -> str:
    return f"<S{i}>"


def image_token(code: int) -> str:
    return f"<I{code}>"


@dataclass(frozen=True)
class ImageVocab:
    """Where the image-side tokens live in the extended vocabulary."""

    im_start: int
    im_end: int
    scales: tuple[int, ...]
    image_offset: int  # id of <I0>; code k -> image_offset + k
    codebook_size: int

    @property
    def vocab_end(self) -> int:
        return self.image_offset + self.codebook_size

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerFast, codebook_size: int) -> "ImageVocab":
        ids = tokenizer.convert_tokens_to_ids([image_token(0), image_token(codebook_size - 1)])
        if ids[1] - ids[0] != codebook_size - 1:
            raise ValueError(f"image tokens are not contiguous in the vocabulary ({ids[0]}..{ids[1]} for {codebook_size} codes)")
        return cls(
            im_start=tokenizer.convert_tokens_to_ids(IM_START),
            im_end=tokenizer.convert_tokens_to_ids(IM_END),
            scales=tuple(tokenizer.convert_tokens_to_ids([scale_token(i) for i in range(NUM_SCALE_TOKENS)])),
            image_offset=ids[0],
            codebook_size=codebook_size,
        )


def data_engine_corpus(n: int, seed: int = 0) -> Iterator[str]:
    """Text the model will read: captions and paraphrases of every t2i category, and edit instructions."""
    from ..shapeworld.dataset import edit_samples, t2i_samples

    rng = np.random.default_rng(seed)
    t2i, edits = t2i_samples(seed), edit_samples(seed + 1)
    for _ in range(n):
        sample = next(t2i) if rng.random() < 0.7 else next(edits)
        yield sample.get("caption") or sample["instruction"]


def train_text_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> Tokenizer:
    """A byte-level BPE tokenizer learned from `texts` (no image tokens yet)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def extend_tokenizer(tokenizer: PreTrainedTokenizerFast, codebook_size: int) -> tuple[PreTrainedTokenizerFast, ImageVocab]:
    """Add the image-side tokens (idempotent) and return the tokenizer with their ids."""
    specials = [IM_START, IM_END] + [scale_token(i) for i in range(NUM_SCALE_TOKENS)]
    missing = [t for t in specials if tokenizer.convert_tokens_to_ids(t) in (None, tokenizer.unk_token_id)]
    if image_token(0) not in tokenizer.get_vocab():
        missing += [image_token(k) for k in range(codebook_size)]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return tokenizer, ImageVocab.from_tokenizer(tokenizer, codebook_size)


def build_text_tokenizer(codebook_size: int, vocab_size: int = 1024, corpus_size: int = 20000, seed: int = 0) -> tuple[PreTrainedTokenizerFast, ImageVocab]:
    """Train the tiny model's tokenizer on data-engine text and extend it for images."""
    base = train_text_tokenizer(islice(data_engine_corpus(corpus_size, seed), corpus_size), vocab_size)
    fast = PreTrainedTokenizerFast(tokenizer_object=base, pad_token=PAD, eos_token=EOS)
    return extend_tokenizer(fast, codebook_size)
