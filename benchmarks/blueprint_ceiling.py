"""How far can a better blueprint take the frozen renderer? GenEval-ShapeWorld from *true* blueprints.

    python benchmarks/blueprint_ceiling.py                      # the bundled tiny model, 50 prompts per category
    python benchmarks/blueprint_ceiling.py --model PATH --json out.json

For each prompt of the held-out suite, a ground-truth scene is rendered and encoded by the image tokenizer. Those
codes are teacher-forced through the AR model, whose hidden states condition the diffusion model as usual. The
verifier scores the result. This is the ceiling that AR-only training (SFT or GRPO) can reach with this diffusion
model, connector and VAE: RL changes only which blueprint is written.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from blip3o_next.autoregressive import blueprint_hidden_states
from blip3o_next.diffusion import sample_latents
from blip3o_next.evaluation import evaluate_t2i, format_t2i_table, geneval_suite, prompt_jobs, t2i_items
from blip3o_next.image_tokenizer import images_to_tensor, tensor_to_images
from blip3o_next.pipeline import Pipeline
from blip3o_next.shapeworld.render import render
from blip3o_next.shapeworld.sampler import sample_scene_for
from blip3o_next.vae import decode_latents


@torch.no_grad()
def render_true_blueprints(pipe: Pipeline, texts: list[str], images: np.ndarray, generator: torch.Generator) -> list[np.ndarray]:
    """Diffusion output conditioned on the AR hidden states over the image tokenizer's codes of `images`."""
    model = pipe.model
    codes = model.image_tokenizer.encode(images_to_tensor(images))
    ids, mask = pipe.tokenize(texts)
    condition = model.condition(blueprint_hidden_states(model.ar, model.image_vocab, ids, mask, codes))
    cfg = model.config
    latents = sample_latents(pipe.transformer, model.scheduler.config, condition, model.latent_shape, cfg.num_inference_steps, cfg.guidance_scale, generator)
    return list(tensor_to_images(decode_latents(model.vae, latents)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="bundled model name or checkpoint folder")
    parser.add_argument("--per-category", type=int, default=50, help="prompts (at least images) per category, as in `blip3o eval geneval`")
    parser.add_argument("--suite-seed", type=int, default=0, help="which fixed suite")
    parser.add_argument("--seed", type=int, default=0, help="scene and noise seed")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", help="also write the summary here")
    args = parser.parse_args()

    pipe = Pipeline.from_pretrained(args.model)
    prompts, counts = geneval_suite(args.per_category, seed=args.suite_seed)
    jobs = prompt_jobs(counts)
    rng = np.random.default_rng(args.seed)
    scenes = [render(sample_scene_for(prompts[i].requirement, rng, pipe.model.config.image_size)) for i in jobs]
    generator = torch.Generator().manual_seed(args.seed)
    outputs: list[np.ndarray] = []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start : start + args.batch_size]
        outputs += render_true_blueprints(pipe, [prompts[i].text for i in batch], np.stack(scenes[start : start + args.batch_size]), generator)
    items = t2i_items(prompts, jobs, outputs)
    _, summary = evaluate_t2i(items)
    print(f"true blueprints through {args.model}'s AR, connector, diffusion and VAE:")
    print(format_t2i_table(summary))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, **vars(args), "summary": summary}, f, indent=2)


if __name__ == "__main__":
    main()
