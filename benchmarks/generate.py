"""Benchmark text-to-image generation end to end (AR blueprint + diffusion + decode) at the model's defaults.

    python benchmarks/generate.py                  # the bundled tiny model
    python benchmarks/generate.py --model PATH --json out.json

Prints the latency of one image (batch 1; the best and the median of several runs), throughput at batch 16
(images/s), and the process's peak resident memory. Torch uses every core it is given (set OMP_NUM_THREADS to
compare machines).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time

import torch

from blip3o_next.pipeline import Pipeline
from blip3o_next.runtime import keep_freed_memory

PROMPTS = [
    "a photo of a red circle left of a blue star",
    "a photo of three green triangles",
    "a photo of a yellow square and a purple cross",
    'a photo of the word "CAT"',
]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="bundled model name or checkpoint folder")
    parser.add_argument("--repeats", type=int, default=10, help="timed single-image runs")
    parser.add_argument("--batches", type=int, default=3, help="timed batch-16 runs")
    parser.add_argument("--steps", type=int, help="diffusion steps (default: the model's)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="weights and compute")
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    keep_freed_memory()  # as the `blip3o` CLI does

    pipe = Pipeline.from_pretrained(args.model, torch_dtype=getattr(torch, args.dtype))
    cfg = pipe.model.config
    steps = args.steps or cfg.num_inference_steps
    pipe(PROMPTS[0], seed=0, num_inference_steps=steps)  # warm-up
    singles = [timed(lambda i=i: pipe(PROMPTS[i % len(PROMPTS)], seed=i, num_inference_steps=steps)) for i in range(args.repeats)]
    batch = [PROMPTS[i % len(PROMPTS)] for i in range(16)]
    batched = [timed(lambda k=k: pipe(batch, seed=k, num_inference_steps=steps)) for k in range(args.batches)]
    result = {
        "settings": {"steps": steps, "guidance": cfg.guidance_scale, "threads": torch.get_num_threads(), "dtype": args.dtype},
        "batch1_seconds_best": round(min(singles), 3),
        "batch1_seconds_median": round(statistics.median(singles), 3),
        "batch16_images_per_s": round(16 / statistics.median(batched), 2),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "parameters_m": round(sum(p.numel() for p in pipe.model.parameters()) / 1e6, 2),
    }
    print(f"one image (batch 1): median {result['batch1_seconds_median']:.3f} s, best {result['batch1_seconds_best']:.3f} s "
          f"({steps} steps, guidance {cfg.guidance_scale}, {args.dtype}, {torch.get_num_threads()} threads)")
    print(f"batch 16: {result['batch16_images_per_s']:.2f} images/s")
    print(f"peak resident memory: {result['peak_rss_mib']:.0f} MiB ({result['parameters_m']} M parameters)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
