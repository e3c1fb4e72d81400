"""Text-to-image plan score of a semantic-blueprint model at several AR sampling settings: the blueprints it writes
for a GenEval-ShapeWorld suite, decoded and checked against each prompt (no diffusion; about 40 s a setting and
seed). Picks the model's `temperature`, `id_temperature` (`autoregressive.kind_first_sample`) and `best_of`.

    python benchmarks/t2i_plans.py --settings 1:none 1:0.5 1:0.3 1:0.5:8 --suite-seed 7 --seeds 0 100 200

A suite seed other than 0 drops the prompts of the held-out suite (suite seed 0 at 50 per category, what `blip3o
eval geneval --per-category 50` scores), so settings are chosen on prompts the evaluation never sees. Single-object,
two-object, counting and colors prompts all occur in it, so such a suite holds position, color_attr, text and dense.
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from blip3o_next.eval.suites import format_t2i_table, geneval_suite, plan_summary, prompt_jobs, t2i_items
from blip3o_next.models.autoregressive import SamplingConfig
from blip3o_next.pipeline import Pipeline


def validation_suite(per_category: int, suite_seed: int, heldout_per_category: int = 50) -> tuple[list, list[int]]:
    """The GenEval suite drawn with `suite_seed`, less any prompt of the held-out suite (suite seed 0,
    `heldout_per_category` prompts per category) unless `suite_seed` is 0."""
    prompts, counts = geneval_suite(per_category, seed=suite_seed)
    if suite_seed == 0:
        return prompts, counts
    heldout = {p.text for p in geneval_suite(heldout_per_category, seed=0)[0]}
    kept = [(p, n) for p, n in zip(prompts, counts) if p.text not in heldout]
    return [p for p, _ in kept], [n for _, n in kept]


def t2i_plans(pipe: Pipeline, prompts: list, counts: list[int], sampling: SamplingConfig, seed: int, batch_size: int) -> dict:
    """The plan summary of the suite written with `sampling`; batch k is drawn with seed `seed + k`, as in
    `blip3o eval geneval`."""
    jobs = prompt_jobs(counts)
    texts = [prompts[i].text for i in jobs]
    codes = torch.cat([pipe.sample_blueprints(texts[start : start + batch_size], seed=seed + k, sampling=sampling)
                       for k, start in enumerate(tqdm(range(0, len(texts), batch_size), desc=str(sampling), unit="batch"))])
    return plan_summary(t2i_items(prompts, jobs, [None] * len(jobs), codes.numpy()))


def parse_setting(setting: str) -> SamplingConfig:
    """TEMPERATURE:ID_TEMPERATURE[:BEST_OF] ('none': one draw over all ids; BEST_OF blueprints sampled, the most
    likely kept, default 1) -> sampling without truncation."""
    temperature, id_temperature, best_of = (setting.split(":") + ["1"])[:3]
    return SamplingConfig(temperature=float(temperature), top_k=0, top_p=1.0,
                          id_temperature=None if id_temperature == "none" else float(id_temperature), best_of=int(best_of))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="bundled model name or checkpoint folder (a semantic-blueprint model)")
    parser.add_argument("--settings", nargs="+", default=["1:none", "1:0.5", "0:none"],
                        help="AR sampling settings TEMPERATURE:ID_TEMPERATURE[:BEST_OF] (temperature 0: greedy; id temperature 'none': one draw "
                             "over all ids; BEST_OF: blueprints sampled per image, the most likely kept)")
    parser.add_argument("--per-category", type=int, default=50, help="prompts per category, as in `blip3o eval geneval`")
    parser.add_argument("--suite-seed", type=int, default=7, help="the suite's prompts (0: the held-out evaluation suite itself)")
    parser.add_argument("--heldout-per-category", type=int, default=50, help="the held-out suite's size, whose prompts a validation suite drops")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="generation seeds, each scored on its own")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the summaries here")
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    if not pipe.model.semantic:
        raise SystemExit(f"{args.model}: needs a semantic-blueprint model")
    prompts, counts = validation_suite(args.per_category, args.suite_seed, args.heldout_per_category)
    print(f"{len(prompts)} prompts, {sum(counts)} blueprints per setting and seed")
    results = {}
    for setting in args.settings:
        for seed in args.seeds:
            results[f"{setting}@{seed}"] = summary = t2i_plans(pipe, prompts, counts, parse_setting(setting), seed, args.batch_size)
            print(f"plan score at {setting} (temperature:id_temperature[:best_of]), seed {seed}:")
            print(format_t2i_table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "plan": results}, f, indent=2)


if __name__ == "__main__":
    main()
