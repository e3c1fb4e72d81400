"""Accuracy of the semantic tokenizer's encoder: random renders -> blueprint ids -> decoded scene, against the truth.

    python benchmarks/semantic_tokenizer.py --model runs/tiny/semantic_tokenizer/final [--n 2000] [--json out.json]

For each degradation of the data engine (clean, blur, noise, JPEG, color drift, combined, specks) it renders the same
`--n` random scenes, encodes them, decodes the blueprints and scores per field, as the verifier's own benchmark does:
background, object count and word per image; shape, color, center (within 1.5 px) and size (within 1 px) per object,
and `object`: all four of an object's fields right. Targets (the project's): every object field >= 0.995
clean and >= 0.98 under each degradation; words exact >= 0.99 clean.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from blip3o_next.models.image_tokenizer import images_to_tensor
from blip3o_next.models.semantic_blueprint import decode_tokens, encode_scene
from blip3o_next.models.semantic_encoder import SemanticEncoder
from blip3o_next.shapeworld.degrade import DEGRADATIONS
from blip3o_next.shapeworld.render import render
from blip3o_next.shapeworld.sampler import sample_scene
from blip3o_next.shapeworld.world import Scene, scale
from blip3o_next.eval.verifier.accuracy import CENTER_TOLERANCE, FieldCounts, compare

SIZE_TOLERANCE = 1.0  # px at S = 64


def encodable_scenes(n: int, canvas: int, seed: int) -> list[Scene]:
    """`n` random scenes the codec can write (it refuses the rare scene with two anchors in one cell)."""
    rng, scenes = np.random.default_rng(seed), []
    while len(scenes) < n:
        scene = sample_scene(rng, canvas)
        try:
            encode_scene(scene)
        except ValueError:
            continue
        scenes.append(scene)
    return scenes


def score(truth: list[Scene], read: list[Scene]) -> dict[str, float]:
    counts = FieldCounts()
    size_ok, object_ok, objects = 0, 0, 0
    tol, size_tol = CENTER_TOLERANCE * scale(truth[0].canvas), SIZE_TOLERANCE * scale(truth[0].canvas)
    for t, r in zip(truth, read):
        matched = compare(t, r, counts)
        for i, o in enumerate(t.objects):
            p = r.objects[matched[i]] if i in matched else None
            size = p is not None and abs(p.size - o.size) <= size_tol
            whole = size and p.shape == o.shape and p.color == o.color and float(np.hypot(o.cx - p.cx, o.cy - p.cy)) <= tol
            size_ok, object_ok, objects = size_ok + size, object_ok + whole, objects + 1
    return {**counts.accuracy(), "size": size_ok / objects, "object": object_ok / objects}


@torch.no_grad()
def read_scenes(model: SemanticEncoder, images: np.ndarray, batch: int = 256) -> list[Scene]:
    ids = torch.cat([model.encode(images_to_tensor(images[i : i + batch])) for i in range(0, len(images), batch)])
    return [decode_tokens(row, model.vocab) for row in ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a trained SemanticEncoder folder")
    parser.add_argument("--n", type=int, default=2000, help="random scenes per degradation")
    parser.add_argument("--seed", type=int, default=2026, help="scene and degradation seed (training never sees it)")
    parser.add_argument("--json", help="also write the table here")
    args = parser.parse_args()
    model = SemanticEncoder.from_pretrained(args.model, use_safetensors=True).eval()
    scenes = encodable_scenes(args.n, model.config.image_size, args.seed)
    clean = np.stack([render(s) for s in scenes])
    table, start = {}, time.perf_counter()
    for di, (name, degradation) in enumerate(DEGRADATIONS.items()):
        rng = np.random.default_rng([args.seed, di])
        images = np.stack([degradation.apply(img, rng) for img in clean])
        table[name] = score(scenes, read_scenes(model, images))
        print(f"{name:<10}" + "".join(f" {k} {v:.4f}" for k, v in table[name].items()), flush=True)
    print(f"{args.n} scenes x {len(DEGRADATIONS)} degradations in {time.perf_counter() - start:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "n": args.n, "seed": args.seed, "accuracy": table}, f, indent=2)


if __name__ == "__main__":
    main()
