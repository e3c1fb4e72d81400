"""The autoregressive model: transformers' Qwen3ForCausalLM over the extended vocabulary, and the blueprint
sampler.

The sequence is `prompt <im_start> <S0> img_1 .. img_n <im_end>`. The diffusion model is conditioned on the
last-layer hidden states of the image span (<S0> and the n image tokens). The sampler produces the tokens and
those hidden states in one KV-cached pass; the official code runs `generate` and then a second full forward
only to read the hidden states.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import Qwen3ForCausalLM, StaticCache
from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import BaseModelOutputWithPast

from .semantic_blueprint import TokenKind
from .semantic_embedding import HierarchyLogProbs, SemanticEmbedding, input_embeddings
from .text_tokenizer import ImageVocab


@dataclass(frozen=True)
class SamplingConfig:
    """AR sampling settings (official inference: top_p 0.95, top_k 1200)."""

    temperature: float = 1.0  # 0 means greedy
    top_k: int = 1200  # 0 disables
    top_p: float = 0.95  # 1.0 disables
    # Semantic blueprints only (`kind_first_sample`): draw each token's kind (EMPTY, a shape anchor, a letter, ...)
    # at `temperature`, then its id within that kind at this temperature (0: the most probable id). None: one draw
    # over all ids at `temperature`. Ignored when `temperature` is 0 (greedy throughout).
    id_temperature: float | None = None
    # Sample this many blueprints per prompt and keep the one the model finds most likely (the highest sum of its
    # tokens' log-probabilities): vLLM's and OpenAI's `best_of`. Reads nothing but the model's own probabilities.
    # Ignored when `temperature` is 0 (greedy writes one blueprint).
    best_of: int = 1

    def __post_init__(self):
        if not 0 <= self.temperature < math.inf or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"invalid sampling settings {self}: need a finite temperature >= 0, top_k >= 0, 0 < top_p <= 1")
        if self.id_temperature is not None and not 0 <= self.id_temperature < math.inf:
            raise ValueError(f"invalid sampling settings {self}: id_temperature must be None or finite and >= 0")
        if self.best_of < 1:
            raise ValueError(f"invalid sampling settings {self}: best_of must be >= 1")

    def processors(self, temperature: float | None = None) -> LogitsProcessorList:
        """Temperature (`temperature`, default this config's), then top-k and top-p, as transformers' warpers."""
        temperature = self.temperature if temperature is None else temperature
        procs = LogitsProcessorList()
        if temperature not in (0.0, 1.0):
            procs.append(TemperatureLogitsWarper(temperature))
        if self.top_k > 0:
            procs.append(TopKLogitsWarper(self.top_k))
        if self.top_p < 1.0:
            procs.append(TopPLogitsWarper(self.top_p))
        return procs


@dataclass
class Blueprint:
    codes: torch.Tensor  # (B, n) image-codebook indices
    hidden_states: torch.Tensor  # (B, 1 + n, hidden): last layer over <S0> and the n image tokens
    prompt_hidden_states: torch.Tensor  # (B, T, hidden): last layer over the (left-padded) prompt, from the prefill
    # (B,) sampled blueprints only: the sum of the codes' log-probabilities at temperature 1 among the ids the sampler
    # allowed (without top-k / top-p), what `best_of` ranks by
    log_likelihood: torch.Tensor | None = None


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left-padded prompts line up."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def image_span_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: ImageVocab) -> tuple[torch.Tensor, torch.Tensor]:
    """Append `<im_start><S0>` to left-padded prompts."""
    prefix = torch.tensor([vocab.im_start, vocab.scales[0]], dtype=input_ids.dtype, device=input_ids.device)
    prefix = prefix.expand(input_ids.shape[0], 2)
    return torch.cat([input_ids, prefix], 1), torch.cat([attention_mask, torch.ones_like(prefix)], 1)


def ar_hidden_states(
    model: Qwen3ForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: ImageVocab, embedding: SemanticEmbedding | None = None
) -> torch.Tensor:
    """Last-layer hidden states of a whole (padded) sequence; image tokens embedded by `embedding` when the
    blueprint is semantic (the AR model's own table then holds the text rows only)."""
    inputs = {"input_ids": input_ids} if embedding is None else {"inputs_embeds": input_embeddings(model, embedding, input_ids, vocab)}
    return model.model(**inputs, attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask)).last_hidden_state


def forced_blueprint(
    model: Qwen3ForCausalLM, vocab: ImageVocab, input_ids: torch.Tensor, attention_mask: torch.Tensor, codes: torch.Tensor,
    embedding: SemanticEmbedding | None = None,
) -> Blueprint:
    """The `Blueprint` that `sample_blueprint` returns when it draws `codes` (B, n) after left-padded prompts, in
    one teacher-forced pass: for a blueprint that is given instead of sampled (RL log-probs, the true-blueprint
    ceiling, `Pipeline(..., blueprints=)`)."""
    ids, mask = image_span_prefix(input_ids, attention_mask, vocab)
    ids = torch.cat([ids, codes + vocab.image_offset], 1)
    mask = torch.cat([mask, torch.ones_like(codes)], 1)
    hidden = ar_hidden_states(model, ids, mask, vocab, embedding)
    return Blueprint(codes=codes, hidden_states=hidden[:, -(codes.shape[1] + 1) :], prompt_hidden_states=hidden[:, : input_ids.shape[1]])


def _sample(
    logits: torch.Tensor, input_ids: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None,
    kinds: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one code per row. A semantic blueprint (`kinds`: its id -> token kind map) draws with
    `sample_categorical` and decodes greedily kind first (`kind_first_argmax`); VQ codebooks keep
    `torch.multinomial` and the plain argmax, so that their documented results reproduce draw for draw."""
    if sampling.temperature == 0:
        return logits.argmax(-1) if kinds is None else kind_first_argmax(logits, kinds)
    if kinds is not None and sampling.id_temperature is not None:
        return kind_first_sample(logits, kinds, input_ids, sampling, generator)
    probs = sampling.processors()(input_ids, logits.float()).softmax(-1)
    return sample_categorical(probs, generator) if kinds is not None else torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def kind_mass(log_probs: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """(B, kinds) the total probability of each kind of token; `log_probs` (B, ids), `kinds` (ids,) each id's
    `TokenKind`."""
    return log_probs.new_zeros(log_probs.shape[0], len(TokenKind), dtype=torch.float32).index_add_(1, kinds, log_probs.float().exp())


def kind_first_argmax(log_probs: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
    """Greedy decoding of a semantic blueprint position: the most probable kind of token (EMPTY, a shape anchor, a
    letter, ...) by its total probability, then the most probable id of that kind. The plain argmax over ids
    compares one shape anchor (its shape, color, size and one of 64 offsets) against EMPTY as a whole, so where an
    edit adds or moves an object the model's probability of "an object here" (often over 0.5) is split over many
    ids and the cell stays EMPTY: greedy edits copied the reference (docs/editing.md). `log_probs` (B, ids), -inf
    where an id is not allowed; `kinds` (ids,) each id's `TokenKind`."""
    best = kind_mass(log_probs, kinds).argmax(-1, keepdim=True)
    return log_probs.masked_fill(kinds != best, -torch.inf).argmax(-1)


def kind_first_sample(
    log_probs: torch.Tensor, kinds: torch.Tensor, input_ids: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None
) -> torch.Tensor:
    """Sample a semantic blueprint position in two draws: its kind of token at `sampling.temperature` from the
    kinds' total probabilities, then an id of that kind at `sampling.id_temperature` (with top-k and top-p).

    A cooler draw over all ids deletes objects: one shape anchor (a shape, color, size and one of 64 offsets)
    competes with EMPTY as a whole, so cooling favours EMPTY (plan score 0.61 at temperature 0.5 against 0.92 at 1,
    docs/semantic_blueprint.md). Cooled within its kind, a draw keeps the model's own odds of writing an object or
    a letter and sharpens only which one: placements and spellings off the mode get rarer."""
    mass = kind_mass(log_probs, kinds)
    kind = sample_categorical(mass.log().div(sampling.temperature).softmax(-1), generator)
    within = log_probs.float().masked_fill(kinds != kind[:, None], -torch.inf)
    if sampling.id_temperature == 0:
        return within.argmax(-1)
    return sample_categorical(sampling.processors(sampling.id_temperature)(input_ids, within).softmax(-1), generator)


def sample_hierarchy(
    lp: HierarchyLogProbs, embedding: SemanticEmbedding, sampling: SamplingConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one semantic blueprint id per row level by level, kind, then head, then offset, and return it with its
    log-probability among the allowed ids. The distribution is exactly the flat one over all 49,311 ids (`_sample`
    on `SemanticEmbedding.full_log_probs` masked by `allowed`: `kind_first_sample`, one draw at `temperature`, or
    greedy `kind_first_argmax`), because p(id) ** beta = p(kind) ** beta * p(head | kind) ** beta * p(offset) ** beta
    sums over the offsets of a head and the heads of a kind in closed form. Drawn from 6 + 801 + 64 numbers instead
    of 49,311, 8 blueprints of one prompt took 0.35 s instead of 0.85 s (docs/semantic_blueprint.md, "Speed").
    Top-k and top-p rank all ids at once, so they keep the flat draw."""
    rows = torch.arange(lp.head.shape[0], device=lp.head.device)

    def head_weights(beta: float) -> torch.Tensor:  # log sum over a head's allowed offsets of p(head, offset | kind) ** beta
        return untempered if beta == 1.0 else beta * lp.head + (beta * lp.offset).logsumexp(-1)[:, embedding.head_class]

    def draw(logits: torch.Tensor) -> torch.Tensor:
        return sample_categorical(logits.softmax(-1), generator)

    untempered = lp.head + lp.offset.logsumexp(-1)[:, embedding.head_class]
    mass = lp.kind + embedding.kind_logsumexp(untempered)  # log p(kind, an allowed id of it)
    temperature, id_temperature = sampling.temperature, sampling.id_temperature
    if temperature == 0:
        kind, beta = mass.argmax(-1), None
    elif id_temperature is None:  # one draw over all ids at `temperature`
        kind, beta = draw(lp.kind / temperature + embedding.kind_logsumexp(head_weights(1.0 / temperature))), 1.0 / temperature
    else:
        kind, beta = draw(mass / temperature), (1.0 / id_temperature if id_temperature > 0 else None)
    other_kind = embedding.head_kind != kind[:, None]
    if beta is None:  # the most probable id of the kind
        head = (lp.head + lp.offset.amax(-1)[:, embedding.head_class]).masked_fill(other_kind, -torch.inf).argmax(-1)
        offsets = lp.offset[rows, embedding.head_class[head]]
        slot = offsets.argmax(-1)
    else:
        head = draw(head_weights(beta).masked_fill(other_kind, -torch.inf))
        offsets = lp.offset[rows, embedding.head_class[head]]
        slot = draw(beta * offsets)
    log_likelihood = lp.kind[rows, kind] + lp.head[rows, head] + offsets[rows, slot] - mass.logsumexp(-1)
    return embedding.head_first_id[head] + slot, log_likelihood


def sample_categorical(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` (B, K), drawn by inverting the cumulative distribution (the same distribution
    as `torch.multinomial`, other random numbers). Written out because `torch.multinomial` is ~30x slower on CPU
    for 49,311 ids (130 ms against 4 ms for 128 rows). An index of probability 0 is never drawn: `right=True` finds
    the first cumulative sum above u, and a u rounded up to the total falls back to the last index of positive
    probability."""
    cumulative = probs.cumsum(-1)
    u = torch.rand((probs.shape[0], 1), generator=generator, device=probs.device, dtype=cumulative.dtype) * cumulative[:, -1:]
    last = torch.where(probs > 0, torch.arange(probs.shape[-1], device=probs.device), -1).amax(-1)
    return torch.minimum(torch.searchsorted(cumulative, u, right=True).squeeze(-1), last)


def cache_length(sequence_length: int, bucket: int = 64) -> int:
    """The static KV cache's length: the sequence rounded up to a multiple of `bucket`, so prompts of similar
    length share one shape (a compiled decoder then compiles once per bucket, not once per prompt length)."""
    return -(-sequence_length // bucket) * bucket


@torch.no_grad()
def sample_blueprint(
    model: Qwen3ForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab: ImageVocab,
    num_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    generator: torch.Generator | None = None,
    decoder: Callable[..., BaseModelOutputWithPast] | None = None,
    embedding: SemanticEmbedding | None = None,
) -> Blueprint:
    """Sample `num_tokens` image tokens after left-padded prompts, keeping the last-layer hidden states.

    One prefill over the prompt and `<im_start><S0>`, then one cached step per image token. Sampling is
    restricted to the image codebook; every random draw uses `generator`. The KV cache, the attention mask and
    the token buffer are allocated once, so every step has the same shapes; `decoder` (default `model.model`)
    runs those steps, e.g. a `torch.compile`d `model.model` (see `Pipeline(compile_ar=True)`).

    A semantic blueprint (`embedding` given) reads image tokens through the embedding's rows and draws them from
    its factor hierarchy (`sample_hierarchy`), among the ids `SemanticEmbedding.allowed` leaves after the tokens
    written so far (the position's kind of token; shapes inside the canvas and apart; words in their band).

    `sampling.best_of` > 1 samples that many blueprints per prompt and returns the most likely (`best_blueprint`).
    """
    if sampling.best_of > 1 and sampling.temperature > 0:
        return best_blueprint(model, input_ids, attention_mask, vocab, num_tokens, sampling, generator, decoder, embedding)
    decoder = model.model if decoder is None else decoder
    ids, mask = image_span_prefix(input_ids, attention_mask, vocab)
    batch, prefix = ids.shape
    length = cache_length(prefix + num_tokens)
    cache = StaticCache(config=model.config, max_cache_len=length)
    # Positions past the current token are hidden by the causal mask, so the mask can be written once, in full.
    full_mask = torch.cat([mask, mask.new_ones(batch, length - prefix)], 1)
    # Each step's 4-D mask (the real tokens up to it), built once: transformers uses a 4-D mask as given, where a
    # 2-D one is turned into 4-D again at every step (a tenth of a step's time at this size).
    seen = torch.arange(length, device=ids.device) < torch.arange(prefix + 1, prefix + num_tokens + 1, device=ids.device)[:, None]
    step_masks = full_mask.bool()[:, None, None, :] & seen  # (B, 1, num_tokens, length)
    tokens = torch.cat([ids, ids.new_zeros(batch, num_tokens)], 1)  # the processors read the history
    positions = position_ids_from_mask(mask)
    # An edit's prompt holds the reference image's tokens, which a semantic blueprint embeds through its factors.
    prompt = {"input_ids": ids} if embedding is None else {"inputs_embeds": input_embeddings(model, embedding, ids, vocab)}
    out = model.model(**prompt, attention_mask=full_mask, position_ids=positions, past_key_values=cache,
                      use_cache=True, cache_position=torch.arange(prefix, device=ids.device))
    hidden = [out.last_hidden_state[:, -1:]]
    prompt_hidden = out.last_hidden_state[:, : input_ids.shape[1]]
    next_pos = positions[:, -1:] + 1
    log_likelihood = torch.zeros(batch, device=ids.device)
    head_rows = None if embedding is None else embedding.head_rows()  # the weights stay fixed while sampling: built once
    for step in range(num_tokens):
        at = prefix + step
        codes, code_log_likelihood = _next_codes(model, hidden[-1][:, -1], tokens[:, :at], prefix, vocab, sampling, generator, embedding, head_rows)
        log_likelihood += code_log_likelihood
        tokens[:, at] = codes + vocab.image_offset
        # A semantic token's row is built from its factors for the drawn ids only: the whole table (49,311 rows) cost
        # a quarter of a blueprint's time at batch 1, and the rows are the same either way.
        step_input = {"input_ids": tokens[:, at : at + 1]} if embedding is None else {"inputs_embeds": embedding(codes, head_rows).to(model.dtype)[:, None]}
        out = decoder(**step_input, attention_mask=step_masks[:, :, step : step + 1], position_ids=next_pos, past_key_values=cache,
                      use_cache=True, cache_position=torch.tensor([at], device=ids.device))
        hidden.append(out.last_hidden_state.clone())  # a compiled decoder may reuse its output buffer
        next_pos = next_pos + 1
    codes = tokens[:, prefix:] - vocab.image_offset
    return Blueprint(codes=codes, hidden_states=torch.cat(hidden, 1), prompt_hidden_states=prompt_hidden, log_likelihood=log_likelihood)


def _next_codes(
    model: Qwen3ForCausalLM, hidden: torch.Tensor, history: torch.Tensor, prefix: int, vocab: ImageVocab, sampling: SamplingConfig,
    generator: torch.Generator | None, embedding: SemanticEmbedding | None, head_rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next image code per row after `history` (B, t) (the blueprint starts at `prefix`), drawn from the last
    hidden state `hidden` (B, H), and its log-probability among the codes the sampler allowed: VQ codes from the
    LM head, semantic ids level by level (`sample_hierarchy`), or flat where top-k or top-p need every id's
    (`head_rows`: the embedding's, built once per blueprint)."""
    if embedding is None:
        logits = model.lm_head(hidden)[:, vocab.image_offset : vocab.vocab_end]
    else:
        written = history[:, prefix:] - vocab.image_offset
        if sampling.top_k == 0 and sampling.top_p == 1.0:
            return sample_hierarchy(embedding.constrained_log_probs(hidden, written, head_rows), embedding, sampling, generator)
        logits = embedding.full_log_probs(hidden, written.shape[1]).masked_fill(~embedding.allowed(written), -torch.inf)
    codes = _sample(logits, history, sampling, generator, None if embedding is None else embedding.kind_of)
    return codes, logits.float().log_softmax(-1).gather(-1, codes[:, None]).squeeze(-1)


def best_blueprint(
    model: Qwen3ForCausalLM, input_ids: torch.Tensor, attention_mask: torch.Tensor, vocab: ImageVocab, num_tokens: int,
    sampling: SamplingConfig, generator: torch.Generator | None, decoder: Callable[..., BaseModelOutputWithPast] | None,
    embedding: SemanticEmbedding | None,
) -> Blueprint:
    """`sampling.best_of` blueprints per prompt, sampled together (prompt i's in rows i*k .. i*k + k - 1), and for each
    prompt the one of the highest log-likelihood. A semantic blueprint's plan fails mostly where one early token
    commits to a placement that the rest cannot honour (the first of two objects on the wrong side of a relation),
    and such plans are less likely as a whole: rendering the most likely of 8 took the tiny model's held-out position
    images from 0.720 to 0.787 (docs/semantic_blueprint.md, "Best of N")."""
    k = sampling.best_of
    rows = sample_blueprint(model, input_ids.repeat_interleave(k, 0), attention_mask.repeat_interleave(k, 0), vocab, num_tokens,
                            dataclasses.replace(sampling, best_of=1), generator, decoder, embedding)
    pick = rows.log_likelihood.view(-1, k).argmax(-1) + torch.arange(0, rows.codes.shape[0], k, device=rows.codes.device)
    return Blueprint(rows.codes[pick], rows.hidden_states[pick], rows.prompt_hidden_states[pick], rows.log_likelihood[pick])


def image_block(vocab: ImageVocab, codes: list[int]) -> list[int]:
    """`<im_start><S0> img_1 .. img_n <im_end>`."""
    return [vocab.im_start, vocab.scales[0], *(vocab.image_offset + c for c in codes), vocab.im_end]


def prompt_ids(tokenizer, vocab: ImageVocab, text: str, max_text_tokens: int, reference_codes: list[int] | None = None) -> tuple[list[int], bool]:
    """The AR input before the answer's `<im_start><S0>`: the prompt, or for an edit `instruction` followed by the
    reference image's block. The instruction comes first so that each answer token sits at a fixed distance
    from the reference token at the same place, a copy a small model learns easily.

    Returns the ids and whether the text was cut to `max_text_tokens`."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    truncated = len(ids) > max_text_tokens
    ids = ids[:max_text_tokens]
    if reference_codes is not None:
        ids = ids + image_block(vocab, reference_codes)
    return ids, truncated


def build_sequences(
    tokenizer,
    vocab: ImageVocab,
    prompts: list[str],
    codes: torch.Tensor,
    max_prompt_tokens: int,
    reference_codes: list[list[int] | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded training sequences `prompt <im_start><S0> codes <im_end> <eos>` and their labels; for edit
    samples (a `reference_codes` entry that is not None) the prompt is `instruction <reference image block>`.

    Labels cover text and image tokens, except an edit's reference block, which is given, not written
    (padding is -100 too). Prompts longer than `max_prompt_tokens` keep their first tokens.
    """
    rows, given = [], []
    references = reference_codes or [None] * len(prompts)
    for prompt, row_codes, reference in zip(prompts, codes.tolist(), references):
        ids, _ = prompt_ids(tokenizer, vocab, prompt, max_prompt_tokens, reference)
        rows.append(ids + image_block(vocab, row_codes) + [tokenizer.eos_token_id])
        given.append(range(len(ids) - (len(reference) + 3), len(ids)) if reference is not None else range(0))
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        attention_mask[i, : len(r)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    for i, span in enumerate(given):
        labels[i, list(span)] = -100
    return input_ids, attention_mask, labels
