"""Benchmark the ShapeWorld data engine and verifier: accuracy per field and degradation, and single-core speed.

    python benchmarks/data_engine.py            # 2,000 renders per canvas size (a few minutes)
    python benchmarks/data_engine.py --n 300    # quicker

Speeds are measured on one core (thread pools pinned to 1) and printed; they are not asserted.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one core: must be set before numpy starts its thread pools

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from blip3o_next.shapeworld.degrade import DEGRADATIONS  # noqa: E402
from blip3o_next.shapeworld.render import render  # noqa: E402
from blip3o_next.shapeworld.sampler import sample_scene  # noqa: E402
from blip3o_next.eval.verifier import SceneParser  # noqa: E402
from blip3o_next.eval.verifier.accuracy import FIELDS, verifier_accuracy  # noqa: E402

FLOORS = {"clean": 0.995, "blur": 0.97, "noise": 0.97, "jpeg": 0.97, "drift": 0.97, "combined": 0.93}


def best_rate(fn, count: int, repeats: int = 3) -> float:
    """Items per second of `fn()` (which handles `count` items), best of a few runs."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return count / best


def speed(n: int, canvas: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng, canvas) for _ in range(n)]
    images = np.stack([render(s) for s in scenes])
    parser = SceneParser()
    parser.parse_batch(images[:16])  # warm caches (glyph templates)
    return {
        "render_scenes_per_s": best_rate(lambda: [render(s) for s in scenes], n),
        "sample_and_render_scenes_per_s": best_rate(lambda: [render(sample_scene(rng, canvas)) for _ in range(n)], n),
        "parse_images_per_s": best_rate(lambda: parser.parse_batch(images), n, repeats=2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="random renders per canvas size for accuracy")
    ap.add_argument("--speed-n", type=int, default=500, help="scenes for the speed measurements")
    ap.add_argument("--canvas", type=int, nargs="+", default=[64, 128], help="canvas sizes")
    ap.add_argument("--json", help="also write the results to this JSON file")
    args = ap.parse_args()
    results: dict = {"accuracy": {}, "speed": {}}
    for canvas in args.canvas:
        t0 = time.perf_counter()
        acc = verifier_accuracy(args.n, canvas, degradations=tuple(DEGRADATIONS), seed=2026)
        results["accuracy"][canvas] = acc
        print(f"\nverifier accuracy, S={canvas}, {args.n} random renders ({time.perf_counter() - t0:.0f} s)")
        print(f"{'degradation':<12}" + "".join(f"{f:>11}" for f in FIELDS) + "   floor")
        for name, row in acc.items():
            floor = FLOORS.get(name)
            ok = "" if floor is None else ("  ok" if min(row.values()) >= floor else "  BELOW")
            print(f"{name:<12}" + "".join(f"{row[f]:>11.4f}" for f in FIELDS) + (f"   {floor}{ok}" if floor else "   -"))
    results["speed"] = speed(args.speed_n, 64)
    print("\nspeed at S=64, one core:")
    for k, v in results["speed"].items():
        print(f"  {k:<32}{v:>10.0f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
