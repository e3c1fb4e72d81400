"""Does the renderer need the reader? GenEval of one RL-tuned model's blueprints rendered two ways: conditioned on
the policy's own hidden states, and on the reader's (a frozen copy of the AR side the renderer was trained with,
re-reading the same blueprints; `Blip3oNext.add_reader`). The blueprints are the same both ways (same seed), so
the plan score is too, and only the images differ.

    python benchmarks/reader_ablation.py --model runs/tiny/semantic_grpo/final --seed 0 --json out.json
    python benchmarks/reader_ablation.py --model POLICY --reader-from START   # a model tuned without a reader

`--reader-from` takes the reader from the model RL started from, for a policy saved without one.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from blip3o_next.eval.suites import evaluate_t2i, format_t2i_table, generate_t2i_items, geneval_suite, plan_summary
from blip3o_next.models.modeling import Blip3oNext
from blip3o_next.pipeline import Pipeline


def geneval(pipe: Pipeline, per_category: int, seed: int) -> dict:
    prompts, counts = geneval_suite(per_category, seed=0)
    items = generate_t2i_items(pipe, prompts, counts, seed=seed, progress=True)
    return {**evaluate_t2i(items)[1], "plan": plan_summary(items)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="an RL-tuned semantic-blueprint model (with a reader, or see --reader-from)")
    parser.add_argument("--reader-from", help="the model RL started from: its AR side becomes the reader")
    parser.add_argument("--per-category", type=int, default=50, help="held-out GenEval prompts (at least images) per category")
    parser.add_argument("--seed", type=int, default=0, help="generation seed")
    parser.add_argument("--json", help="write both summaries here")
    args = parser.parse_args()
    pipe = Pipeline.from_pretrained(args.model)
    model = pipe.model
    if args.reader_from:
        start = Blip3oNext.from_pretrained(args.reader_from)
        model.reader_ar, model.reader_embedding = start.ar.requires_grad_(False), start.image_embedding.requires_grad_(False)
    if model.reader_ar is None:
        parser.error(f"{args.model} has no reader; give --reader-from")
    results = {"reader": geneval(pipe, args.per_category, args.seed)}
    model.reader_ar = model.reader_embedding = None
    results["policy"] = geneval(pipe, args.per_category, args.seed)
    for name, summary in results.items():
        print(f"renderer reads the {name}'s states:")
        print(format_t2i_table(summary))
    print("plan score (the same blueprints both ways):")
    print(format_t2i_table(results["reader"]["plan"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
