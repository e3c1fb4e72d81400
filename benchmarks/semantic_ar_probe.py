"""Probe: the tiny AR model on semantic blueprint tokens alone (no diffusion), measured by the plan score.

Trains the tiny preset's Qwen3 AR model (same size as the bundled model's) to write the exact semantic blueprint of
the data engine's scene after its caption, with the factorised image-token embedding (`models/semantic_embedding.py`),
then samples blueprints for the canonical GenEval-ShapeWorld suite (full distribution: no top-k / top-p, only the
sampler's constraint `SemanticEmbedding.allowed`) and scores each decoded plan against its prompt with the verifier's checks
(`semantic_blueprint.plan_score`). Says how far the AR half of the semantic design gets in minutes of CPU.

    python benchmarks/semantic_ar_probe.py --minutes 25 --out runs/semantic_ar_probe
    python benchmarks/semantic_ar_probe.py --eval-only --out runs/semantic_ar_probe
"""

from __future__ import annotations

import argparse
import json
import math
import time
from itertools import islice
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from blip3o_next.models.autoregressive import SamplingConfig, build_sequences, position_ids_from_mask, prompt_ids, sample_blueprint
from blip3o_next.eval.suites import format_t2i_table, geneval_suite, prompt_jobs
from blip3o_next.models.presets import tiny_parts_configs
from blip3o_next.eval.scorers import summarize_t2i
from blip3o_next.models.semantic_blueprint import DEFAULT_VOCAB, plan_score
from blip3o_next.models.semantic_embedding import SemanticEmbedding, input_embeddings, token_log_probs
from blip3o_next.shapeworld.dataset import t2i_samples
from blip3o_next.training.stages import ModelStage
from blip3o_next.models.text_tokenizer import build_text_tokenizer, extend_tokenizer

WEIGHTS = {"single_object": 0.5, "two_object": 1.0, "counting": 1.0, "colors": 0.5, "position": 1.0, "color_attr": 1.0, "text": 1.5, "dense": 1.5}


def load_or_build_tokenizer(out: Path) -> PreTrainedTokenizerFast:
    folder = out / "tokenizer"
    if folder.is_dir():
        return PreTrainedTokenizerFast.from_pretrained(folder)
    tok, _ = build_text_tokenizer(DEFAULT_VOCAB.size)
    tok.save_pretrained(folder)
    return tok


def batch(position: int, size: int, seed: int) -> tuple[list[str], torch.Tensor]:
    samples, codes = ModelStage.exact_blueprints(list(islice(t2i_samples(seed, 64, WEIGHTS, 0.15, start=position), size)))
    return [s["caption"] for s in samples], codes


def sequence_loss(ar, embedding, tok, vocab, prompts, codes) -> torch.Tensor:
    ids, mask, labels = build_sequences(tok, vocab, prompts, codes, 32)
    hidden = ar.model(inputs_embeds=input_embeddings(ar, embedding, ids, vocab), attention_mask=mask, position_ids=position_ids_from_mask(mask)).last_hidden_state
    targets = labels[:, 1:]
    logp = token_log_probs(ar, embedding, hidden[:, :-1], targets, ids, vocab)
    valid = (targets != -100).float()
    return (-(logp * valid).sum(1) / valid.sum(1)).mean()


def train(args, tok, vocab) -> None:
    torch.manual_seed(args.seed)
    # The AR model's table holds the text rows; the image rows are the factorised embedding's.
    ar = Qwen3ForCausalLM(Qwen3Config(**{**tiny_parts_configs(vocab_size=0)["ar"], "vocab_size": vocab.image_offset}))
    embedding = SemanticEmbedding(ar.config.hidden_size)
    params = list(ar.parameters()) + list(embedding.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    start, log = time.time(), []
    bar = tqdm(total=args.steps, desc="AR on semantic tokens")
    for step in range(args.steps):
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        prompts, codes = batch(step * args.batch, args.batch, args.seed)
        loss = sequence_loss(ar, embedding, tok, vocab, prompts, codes)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        log.append({"step": step, "loss": loss.item(), "seconds": time.time() - start})
        bar.update()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if (step + 1) % 200 == 0 or step + 1 == args.steps or time.time() - start > args.minutes * 60:
            ar.save_pretrained(args.out / "ar")
            embedding.save_pretrained(args.out / "image_embedding")
            (args.out / "train_log.json").write_text(json.dumps(log))
            if time.time() - start > args.minutes * 60:
                break


@torch.no_grad()
def evaluate(args, tok, vocab) -> dict:
    ar = Qwen3ForCausalLM.from_pretrained(args.out / "ar", use_safetensors=True).eval()
    embedding = SemanticEmbedding.from_pretrained(args.out / "image_embedding", use_safetensors=True).eval()
    sampling = SamplingConfig(temperature=args.temperature, top_k=0, top_p=1.0)
    prompts, per_prompt = geneval_suite(args.per_category)
    jobs = prompt_jobs(per_prompt)
    categories, results = [], []
    for seed in args.seeds:
        generator = torch.Generator().manual_seed(seed)
        for lo in tqdm(range(0, len(jobs), 64), desc=f"plans, seed {seed}"):
            chunk = [prompts[i] for i in jobs[lo : lo + 64]]
            rows = [prompt_ids(tok, vocab, p.text, 32)[0] for p in chunk]
            width = max(map(len, rows))
            ids = torch.tensor([[tok.pad_token_id] * (width - len(r)) + r for r in rows])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
            bp = sample_blueprint(ar, ids, mask, vocab, DEFAULT_VOCAB.config.seq_len, sampling, generator, embedding=embedding)
            for p, codes in zip(chunk, bp.codes):
                categories.append(p.category)
                results.append(plan_score(codes.tolist(), p.requirement))
    summary = summarize_t2i(categories, results)
    print(format_t2i_table(summary))
    (args.out / f"plan_score_{args.per_category}.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/semantic_ar_probe"), help="output folder")
    parser.add_argument("--steps", type=int, default=4000, help="optimizer steps at most")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-clock training budget")
    parser.add_argument("--batch", type=int, default=64, help="sequences per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    parser.add_argument("--seed", type=int, default=0, help="data and initialisation seed")
    parser.add_argument("--per-category", type=int, default=50, help="GenEval-ShapeWorld images per category and seed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 100, 200], help="sampling seeds, pooled")
    parser.add_argument("--temperature", type=float, default=1.0, help="AR sampling temperature (0: greedy)")
    parser.add_argument("--eval-only", action="store_true", help="score the saved model without training")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    tok = load_or_build_tokenizer(args.out)
    _, vocab = extend_tokenizer(tok, DEFAULT_VOCAB.size)
    if not args.eval_only:
        train(args, tok, vocab)
    evaluate(args, tok, vocab)


if __name__ == "__main__":
    main()
