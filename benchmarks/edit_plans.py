"""Edit plan score of a semantic-blueprint model at several AR sampling settings: the blueprints it writes for the
imgedit suite, decoded and checked against each pair's source and instruction (no diffusion; about a minute a
setting). Picks the model's `edit_temperature`; a suite seed other than 0 holds edits the evaluation never sees.

    python benchmarks/edit_plans.py --model runs/tiny/semantic_edit_sft/final --settings 0:none 1:none 1:0.3 --suite-seed 7
"""

from __future__ import annotations

import argparse
import json

from tqdm.auto import tqdm

from blip3o_next.models.autoregressive import SamplingConfig
from blip3o_next.eval.suites import EditItem, edit_plan_summary, format_edit_table
from blip3o_next.pipeline import Pipeline
from blip3o_next.shapeworld.edits import edit_suite
from blip3o_next.shapeworld.render import render
from t2i_plans import parse_setting  # this folder is on the path when a benchmark runs as a script


def edit_plans(pipe: Pipeline, pairs: list, sources: list, sampling: SamplingConfig, seed: int, batch_size: int) -> dict:
    """The edit plan summary of `pairs` (their sources drawn as `sources`) written with `sampling`; batch k is drawn
    with seed `seed + k`, as in `blip3o eval imgedit`."""
    items = []
    for k, start in enumerate(tqdm(range(0, len(pairs), batch_size), desc=str(sampling), unit="batch")):
        batch, images = pairs[start : start + batch_size], sources[start : start + batch_size]
        codes = pipe.sample_blueprints([p.instruction for p in batch], seed=seed + k, sampling=sampling, images=images)
        items += [EditItem(f"{start + i:04d}", p.instruction, p.spec, src, src, p.source, p.target, c.numpy())
                  for i, (p, src, c) in enumerate(zip(batch, images, codes))]
    return edit_plan_summary(items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="bundled model name or checkpoint folder (a semantic model trained to edit)")
    parser.add_argument("--settings", nargs="+", default=["0:none", "1:none", "1:0.3"],
                        help="AR sampling settings TEMPERATURE:ID_TEMPERATURE[:BEST_OF], as in t2i_plans.py (temperature 0: greedy; id temperature 'none': one draw over all ids)")
    parser.add_argument("--per-category", type=int, default=30, help="edit pairs per category, as in `blip3o eval imgedit`")
    parser.add_argument("--suite-seed", type=int, default=0, help="the suite's edit pairs (0: the held-out imgedit suite itself)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the summaries here")
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    if not (pipe.model.semantic and pipe.can_edit):
        raise SystemExit(f"{args.model}: needs a semantic-blueprint model trained to edit")
    pairs = edit_suite(args.per_category, seed=args.suite_seed)
    sources = [render(p.source) for p in pairs]
    results = {}
    for setting in args.settings:
        results[setting] = edit_plans(pipe, pairs, sources, parse_setting(setting), args.seed, args.batch_size)
        print(f"edit plan score at {setting} (temperature:id_temperature):")
        print(format_edit_table(results[setting]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "plan": results}, f, indent=2)


if __name__ == "__main__":
    main()
