"""How far can a better blueprint take the frozen renderer? GenEval-ShapeWorld (or ImgEdit) from *true* blueprints.

    python benchmarks/blueprint_ceiling.py                          # the bundled tiny model, 50 prompts per category
    python benchmarks/blueprint_ceiling.py --model PATH --json out.json
    python benchmarks/blueprint_ceiling.py --edits                  # the bundled tiny model on the imgedit suite

For each prompt of the held-out suite, a ground-truth scene is rendered and encoded by the image tokenizer (for a
semantic blueprint: written exactly by the codec, `semantic_blueprint.encode_scene`). Those codes are teacher-forced through the AR model (`Pipeline(..., blueprints=)`), whose hidden states condition the
diffusion model as usual. The verifier scores the result. This is the ceiling that AR-only training (SFT or GRPO)
can reach with this diffusion model, connector and VAE: RL changes only which blueprint is written.

With `--edits`, each edit of the imgedit suite is carried out from the codes of its ground-truth target image, with
the model's usual edit settings (reference latents, keeping and pasting the cells whose codes equal the
reference's): what edit training of the AR model alone could reach.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from blip3o_next.eval.suites import (
    EditItem, evaluate_edits, evaluate_t2i, format_edit_table, format_t2i_table, geneval_suite, prompt_jobs, t2i_items,
)
from blip3o_next.models.image_tokenizer import images_to_tensor
from blip3o_next.pipeline import Pipeline
from blip3o_next.models.semantic_blueprint import encode_scene
from blip3o_next.shapeworld.edits import edit_suite
from blip3o_next.shapeworld.render import render
from blip3o_next.shapeworld.sampler import sample_scene_for
from blip3o_next.shapeworld.world import Scene


def true_codes(pipe: Pipeline, scenes: list[Scene]) -> torch.Tensor:
    """The true blueprints (B, N) of scenes: their exact semantic blueprints, or the VQ codes of their renders."""
    if pipe.model.semantic:
        return torch.tensor([encode_scene(s, pipe.model.image_embedding.vocab) for s in scenes])
    return pipe.image_codes(images_to_tensor(np.stack([render(s) for s in scenes])))


def writable_scene(requirement, rng: np.random.Generator, canvas: int) -> Scene:
    """A scene that satisfies `requirement` and that the semantic codec can write (about 1 in 20,000 cannot: two
    anchors in one cell); the VQ tokenizer writes any scene, and gets the same scenes for comparability."""
    while True:
        scene = sample_scene_for(requirement, rng, canvas)
        try:
            encode_scene(scene)
            return scene
        except ValueError:
            continue


def t2i_ceiling(pipe: Pipeline, args: argparse.Namespace) -> tuple[str, dict]:
    prompts, counts = geneval_suite(args.per_category, seed=args.suite_seed)
    jobs = prompt_jobs(counts)
    rng = np.random.default_rng(args.seed)
    scenes = [writable_scene(prompts[i].requirement, rng, pipe.model.config.image_size) for i in jobs]
    generator = torch.Generator().manual_seed(args.seed)
    outputs: list[np.ndarray] = []
    for start in range(0, len(jobs), args.batch_size):
        batch = slice(start, start + args.batch_size)
        out = pipe([prompts[i].text for i in jobs[batch]], generator=generator, blueprints=true_codes(pipe, scenes[batch]), num_inference_steps=args.steps)
        outputs += [np.asarray(im) for im in out.images]
    _, summary = evaluate_t2i(t2i_items(prompts, jobs, outputs))
    return format_t2i_table(summary), summary


def edit_ceiling(pipe: Pipeline, args: argparse.Namespace) -> tuple[str, dict]:
    pairs = edit_suite(args.per_category, seed=args.suite_seed, canvas=pipe.model.config.image_size)
    sources = np.stack([render(p.source) for p in pairs])
    generator = torch.Generator().manual_seed(args.seed)
    items: list[EditItem] = []
    for start in range(0, len(pairs), args.batch_size):
        batch = slice(start, start + args.batch_size)
        out = pipe.edit(list(sources[batch]), [p.instruction for p in pairs[batch]], generator=generator, blueprints=true_codes(pipe, [p.target for p in pairs[batch]]),
                        num_inference_steps=args.steps)
        items += [
            EditItem(f"{start + i:04d}_{p.spec.category}", p.instruction, p.spec, src, np.asarray(im), p.source, p.target)
            for i, (p, src, im) in enumerate(zip(pairs[batch], sources[batch], out.images))
        ]
    _, summary = evaluate_edits(items)
    return format_edit_table(summary), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundled model name or checkpoint folder", default="tiny")
    parser.add_argument("--edits", action="store_true", help="the imgedit suite instead of GenEval-ShapeWorld")
    parser.add_argument("--per-category", type=int, help="prompts or edits per category, as in `blip3o eval` (default: 50, or 30 with --edits)")
    parser.add_argument("--suite-seed", type=int, default=0, help="which fixed suite")
    parser.add_argument("--seed", type=int, default=0, help="scene and noise seed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, help="diffusion steps (default: the model's)")
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()
    args.per_category = args.per_category or (30 if args.edits else 50)

    pipe = Pipeline.from_pretrained(args.model)
    table, summary = (edit_ceiling if args.edits else t2i_ceiling)(pipe, args)
    print(f"true blueprints through {args.model}'s AR, connector, diffusion and VAE:")
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**vars(args), "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
