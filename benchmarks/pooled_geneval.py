"""Pool GenEval-ShapeWorld results of one before/after comparison over several generation seeds.

One seed's pass rates on 50 images per category carry a standard error of about 0.05, so RL results are compared
on the same held-out suite generated with several seeds (`blip3o eval geneval --seed S --json FILE`):

    python benchmarks/pooled_geneval.py --before b0.json b100.json b200.json --after a0.json a100.json a200.json \
        --json docs/rl/.../eval_pooled_3_seeds.json

Per category it pools the images of all seeds; ± is the standard error of the change, treating the two pass
rates as independent binomial proportions: sqrt(p_b (1 - p_b) / n + p_a (1 - p_a) / n).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from blip3o_next.shapeworld.prompts import GENEVAL_CATEGORIES


def summary(path: str) -> dict:
    data = json.loads(Path(path).read_text())
    return data.get("summary", data)  # `blip3o eval geneval --json` nests it; GRPO's eval_*.json do not


def pool(paths: list[str], part: str | None = None) -> dict:
    """The pooled summary of the files' images, or with `part` ("plan") of that part of their summaries."""
    runs = [summary(p) for p in paths]
    runs = [r[part] for r in runs] if part else runs
    categories = {}
    for cat in runs[0]["categories"]:
        rows = [r["categories"][cat] for r in runs]
        n = sum(r["n"] for r in rows)
        pooled = {"n": n, **{k: sum(r[k] * r["n"] for r in rows) / n for k in ("pass", "partial", "ocr") if k in rows[0]}}
        categories[cat] = pooled
    overall = sum(categories[c]["pass"] for c in GENEVAL_CATEGORIES) / len(GENEVAL_CATEGORIES)
    return {"categories": categories, "overall": overall, "per_seed_overall": [r["overall"] for r in runs], "files": paths}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", nargs="+", required=True, help="eval JSONs of the model before, one per seed")
    parser.add_argument("--after", nargs="+", required=True, help="eval JSONs of the model after, in the same seed order")
    parser.add_argument("--json", help="write both pooled summaries here")
    args = parser.parse_args()
    if len(args.before) != len(args.after):
        parser.error("--before and --after need the same number of files")
    pooled = {"before": pool(args.before), "after": pool(args.after)}
    print_change(pooled["before"], pooled["after"])
    if all("plan" in summary(p) for p in args.before + args.after):  # semantic-blueprint models: the plan score too
        pooled |= {"plan_before": pool(args.before, "plan"), "plan_after": pool(args.after, "plan")}
        print("\nplan score (the blueprints decoded to scenes; no diffusion):")
        print_change(pooled["plan_before"], pooled["plan_after"])
    if args.json:
        Path(args.json).write_text(json.dumps(pooled, indent=1) + "\n")


def print_change(before: dict, after: dict) -> None:
    """A markdown table of the pooled pass rates before and after, with the standard error of each change."""
    print("| category | n | before | after | change |\n|---|---|---|---|---|")
    for cat, b in before["categories"].items():
        a = after["categories"][cat]
        se = math.sqrt(b["pass"] * (1 - b["pass"]) / b["n"] + a["pass"] * (1 - a["pass"]) / a["n"])
        print(f"| {cat} | {b['n']} | {b['pass']:.3f} | {a['pass']:.3f} | {a['pass'] - b['pass']:+.3f} (± {se:.3f}) |")
        if "ocr" in b:
            print(f"| {cat} (OCR reward) | {b['n']} | {b['ocr']:.3f} | {a['ocr']:.3f} | {a['ocr'] - b['ocr']:+.3f} |")
    print(f"| **overall** | | {before['overall']:.3f} | {after['overall']:.3f} | {after['overall'] - before['overall']:+.3f} |")
    print("per seed: " + ", ".join(f"{b:.3f} -> {a:.3f}" for b, a in zip(before["per_seed_overall"], after["per_seed_overall"])))


if __name__ == "__main__":
    main()
