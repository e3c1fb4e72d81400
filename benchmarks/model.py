"""Benchmark the tiny BLIP3o-NEXT: training throughput and achieved GFLOP/s against the machine's measured matmul
peak, and generation latency against an official-style pipeline on the same weights and seeds.

    python benchmarks/model.py                      # random tiny weights (speed does not depend on training)
    python benchmarks/model.py --model tiny         # the bundled model, or a trained model folder

The official-style pipeline is: HF `generate` for the blueprint, then a second full forward pass to read the
hidden states over the image span, then the same CFG diffusion. Both pipelines decode greedily here, so they
must produce the same blueprint and images; the script checks it.
"""

from __future__ import annotations

import argparse
import time
from itertools import islice

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerFast

from blip3o_next.models.autoregressive import SamplingConfig, build_sequences, image_span_prefix, position_ids_from_mask, sample_blueprint
from blip3o_next.models.diffusion import sample_latents
from blip3o_next.models.image_tokenizer import images_to_tensor, tensor_to_images
from blip3o_next.models.modeling import Blip3oNext
from blip3o_next.models.presets import build_model, tiny_parts_configs
from blip3o_next.pipeline import Pipeline, resolve_model_path
from blip3o_next.runtime import keep_freed_memory
from blip3o_next.shapeworld.dataset import t2i_samples
from blip3o_next.models.text_tokenizer import data_engine_corpus, train_text_tokenizer
from blip3o_next.models.vae import decode_latents, encode_latents


def best_time(fn, repeats: int) -> float:
    return best_times({"fn": fn}, repeats)["fn"]


def best_times(fns: dict, repeats: int) -> dict[str, float]:
    """The best of `repeats` timings of each function, taken in interleaved rounds, so that a slow spell of a
    shared machine hits every function alike instead of biasing one."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def matmul_peak_gflops(sizes: tuple[int, ...] = (512, 1024, 2048, 3072), repeats: int = 5) -> float:
    """The best fp32 matmul rate over a few square sizes: what this CPU sustains on dense work."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)
        best = max(best, 2 * n**3 / best_time(lambda: torch.mm(a, b), repeats) / 1e9)
    return best


def tiny_model() -> Blip3oNext:
    texts = list(islice(data_engine_corpus(3000, seed=0), 3000))
    tok = PreTrainedTokenizerFast(tokenizer_object=train_text_tokenizer(texts, 1024), pad_token="<pad>", eos_token="<eos>")
    torch.manual_seed(0)
    return build_model(tok, tiny_parts_configs(vocab_size=0))


def training_benchmark(model: Blip3oNext, batch_size: int, steps: int) -> dict[str, float]:
    samples = list(islice(t2i_samples(0), batch_size))
    x = images_to_tensor(np.stack([s["image"] for s in samples]))
    with torch.no_grad():
        codes, latents = model.image_tokenizer.encode(x), encode_latents(model.vae, x)
    ids, mask, labels = build_sequences(model.tokenizer, model.image_vocab, [s["caption"] for s in samples], codes, 64)
    params = [p for n, p in model.named_parameters() if not n.startswith(("image_tokenizer", "vae"))]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step() -> None:
        loss = model(ids, mask, labels, latents, torch.Generator().manual_seed(0)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    with FlopCounterMode(display=False) as counter:
        step()
    seconds = best_time(step, steps)
    model.eval()
    gflop = corrected_flops(counter) / 1e9
    return {"samples_per_s": batch_size / seconds, "step_s": seconds, "gflop_per_step": gflop, "gflop_per_s": gflop / seconds}


def corrected_flops(counter: FlopCounterMode) -> float:
    """Total FLOPs, with convolution backward counted as twice its forward.

    torch's counter reports ~30x the forward for the backward of SANA's depthwise (grouped) 3x3 convolution,
    which would make the achieved rate exceed the machine's peak; a backward costs about two forwards.
    """
    ops = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return sum(ops.values()) - ops.get("aten.convolution_backward", 0) + 2 * ops.get("aten.convolution", 0)


class ImageTokensOnly(LogitsProcessor):
    """Restrict HF generate to the image codebook (what the official inference does with a vocabulary mask)."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.start : self.end] = scores[:, self.start : self.end]
        return masked


@torch.no_grad()
def official_style_blueprint(pipe: Pipeline, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The AR part of the official style: HF generate, then a second full forward for the hidden states.
    Returns (image codes, last-layer hidden states of the whole sequence)."""
    m = pipe.model
    ids, mask = image_span_prefix(*pipe.tokenize(prompts), m.image_vocab)
    out = m.ar.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=m.num_image_tokens, min_new_tokens=m.num_image_tokens, do_sample=False,
        logits_processor=LogitsProcessorList([ImageTokensOnly(m.image_vocab.image_offset, m.image_vocab.vocab_end)]),
        pad_token_id=m.tokenizer.pad_token_id,
    )
    full_mask = torch.cat([mask, torch.ones_like(out[:, ids.shape[1] :])], 1)
    hidden = m.ar(input_ids=out, attention_mask=full_mask, position_ids=position_ids_from_mask(full_mask), output_hidden_states=True).hidden_states[-1]
    return out[:, ids.shape[1] :] - m.image_vocab.image_offset, hidden


@torch.no_grad()
def official_style(pipe: Pipeline, prompts: list[str], seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """HF generate -> a second full forward for the hidden states -> CFG diffusion -> decode."""
    m = pipe.model
    codes, hidden = official_style_blueprint(pipe, prompts)
    span = hidden[:, -(m.num_image_tokens + 1) :]
    latents = sample_latents(m.transformer, m.scheduler.config, m.condition(span), m.latent_shape, m.config.num_inference_steps,
                             m.config.guidance_scale, torch.Generator().manual_seed(seed))
    return codes, tensor_to_images(decode_latents(m.vae, latents))


def generation_benchmark(pipe: Pipeline, compiled: Pipeline, batch: int, repeats: int) -> dict[str, float]:
    prompts = [s["prompt"] for s in islice(t2i_samples(1), batch)]
    greedy = SamplingConfig(temperature=0)
    ours = lambda: pipe(prompts, seed=0, sampling=greedy)  # noqa: E731
    ours_compiled = lambda: compiled(prompts, seed=0, sampling=greedy)  # noqa: E731
    theirs = lambda: official_style(pipe, prompts, seed=0)  # noqa: E731
    t0 = time.perf_counter()
    c = ours_compiled()  # compiles for this batch size
    first_call = time.perf_counter() - t0
    a, (codes, images) = ours(), theirs()
    pixels = lambda out: np.stack([np.asarray(i) for i in out.images]).astype(int)  # noqa: E731
    ids, mask = pipe.tokenize(prompts)
    m = pipe.model
    ar_ours = lambda: sample_blueprint(m.ar, ids, mask, m.image_vocab, m.num_image_tokens, greedy)  # noqa: E731
    ar_compiled = lambda: sample_blueprint(m.ar, ids, mask, m.image_vocab, m.num_image_tokens, greedy, None, compiled.ar_decoder)  # noqa: E731
    ar_theirs = lambda: official_style_blueprint(pipe, prompts)  # noqa: E731
    t = best_times({"ours": ours, "compiled": ours_compiled, "theirs": theirs, "ar_ours": ar_ours, "ar_compiled": ar_compiled,
                    "ar_theirs": ar_theirs}, repeats)
    return {
        "ours_s_per_image": t["ours"] / batch, "compiled_s_per_image": t["compiled"] / batch, "official_s_per_image": t["theirs"] / batch,
        "speedup": t["theirs"] / t["ours"], "speedup_compiled": t["theirs"] / t["compiled"], "compile_s": first_call - t["compiled"],
        "ar_speedup": t["ar_theirs"] / t["ar_ours"], "ar_speedup_compiled": t["ar_theirs"] / t["ar_compiled"],
        "same_blueprint": bool(torch.equal(a.blueprints, codes) and torch.equal(c.blueprints, codes)),
        "max_pixel_diff": int(max(np.abs(pixels(a) - images).max(), np.abs(pixels(c) - images).max())),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a bundled model name or a trained model folder (default: random tiny weights)")
    ap.add_argument("--batch-size", type=int, default=32, help="training batch")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each variant (the best counts)")
    args = ap.parse_args()
    keep_freed_memory()  # as the `blip3o` CLI does
    model = Blip3oNext.from_pretrained(resolve_model_path(args.model), torch.float32) if args.model else tiny_model()
    peak = matmul_peak_gflops()
    print(f"threads: {torch.get_num_threads()}   matmul peak: {peak:.1f} GFLOP/s (best fp32 square matmul)")
    tr = training_benchmark(model, args.batch_size, args.repeats)
    print(f"training (batch {args.batch_size}): {tr['samples_per_s']:.1f} samples/s, {tr['gflop_per_step']:.1f} GFLOP/step, "
          f"{tr['gflop_per_s']:.1f} GFLOP/s = {tr['gflop_per_s'] / peak:.1%} of the matmul peak")
    pipe, compiled = Pipeline(model), Pipeline(model, compile_transformer=True, compile_ar=True)
    for batch in (1, 16):
        g = generation_benchmark(pipe, compiled, batch, args.repeats)
        print(f"generation batch {batch:>2}: official-style {g['official_s_per_image'] * 1e3:.0f} ms/image; "
              f"ours {g['ours_s_per_image'] * 1e3:.0f} ms/image ({g['speedup']:.2f}x); "
              f"ours compiled {g['compiled_s_per_image'] * 1e3:.0f} ms/image ({g['speedup_compiled']:.2f}x, after a one-off "
              f"{g['compile_s']:.0f} s compilation); AR part alone {g['ar_speedup']:.2f}x, compiled {g['ar_speedup_compiled']:.2f}x "
              f"(same blueprint: {g['same_blueprint']}, max pixel difference {g['max_pixel_diff']})")

if __name__ == "__main__":
    main()
