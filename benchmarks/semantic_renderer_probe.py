"""Probe: can the tiny renderer draw what a *semantic* blueprint says, and how fast does it learn? (no AR model)

    python benchmarks/semantic_renderer_probe.py --minutes 35 --out runs/semantic_renderer_probe   # train, then evaluate
    python benchmarks/semantic_renderer_probe.py --eval-only runs/semantic_renderer_probe           # evaluate a checkpoint
    python benchmarks/semantic_renderer_probe.py --vae-ceiling [--vae FOLDER]                        # the VAE alone

It trains the tiny SANA transformer (with the bundled tiny VAE, frozen) on true blueprints of data-engine scenes
(`semantic_blueprint.encode_scene`), through a stand-in for the AR model: a factorised token embedding (the sum of
one embedding per factor: kind, shape, color, size, dx, dy, ink, cap, letter) and two transformer layers. The
stand-in's states go through the project's `Connector` (cross-attention tokens and the per-cell spatial map) as the
AR hidden states would. With `--footprint` (default) the spatial map also carries, on every latent cell inside an
object's box (the box decoded from its anchor token), that object's state and the cell's position relative to the
box centre in units of the half side: the geometry the transformer otherwise has to discover through attention.

Training as SANA / SD3: flow matching with logit-normal noise levels, EMA weights for sampling, 10% condition dropout
for classifier-free guidance. Evaluation: GenEval-ShapeWorld of the canonical suite (`--per-category`, suite seed 0),
each prompt's image rendered from the true blueprint of a scene that satisfies it, scored by the verifier: the
true-blueprint ceiling of this renderer. `--vae-ceiling` scores the VAE's reconstructions of the same scenes instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from itertools import islice
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderDC, FlowMatchEulerDiscreteScheduler, SanaTransformer2DModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import load_file, save_file
from torch import nn

from blip3o_next.models.connector import Connector
from blip3o_next.models.diffusion import Condition, drop_condition, noisy_latents, predict_velocity, sample_latents, training_sigmas
from blip3o_next.eval.suites import evaluate_t2i, format_t2i_table, geneval_suite, prompt_jobs, t2i_grid, t2i_items
from blip3o_next.fileio import save_png
from blip3o_next.models.image_tokenizer import images_to_tensor, tensor_to_images
from blip3o_next.models.presets import tiny_parts_configs
from blip3o_next.pipeline import resolve_model_path
from blip3o_next.models.semantic_blueprint import DEFAULT_VOCAB, FACTOR_NAMES, anchor_of, decode_tokens, encode_scene
from blip3o_next.shapeworld.dataset import t2i_samples
from blip3o_next.shapeworld.render import render
from blip3o_next.shapeworld.sampler import sample_scene_for
from blip3o_next.training.stages import ModelStage
from blip3o_next.models.vae import decode_latents, encode_latents

HIDDEN, GRID, LATENT_SIDE = 256, 8, 16


class BlueprintEmbedder(nn.Module):
    """Stand-in for the AR model: blueprint ids (B, N) -> states (B, N, HIDDEN)."""

    def __init__(self) -> None:
        super().__init__()
        cards = DEFAULT_VOCAB.factor_cardinalities()
        table = DEFAULT_VOCAB.factor_table()
        self.factors = nn.ModuleDict({n: nn.Embedding(cards[n] + 1, HIDDEN) for n in FACTOR_NAMES})  # row 0: n/a
        for n in FACTOR_NAMES:
            self.register_buffer(f"t_{n}", torch.from_numpy(np.array(table[n])) + 1, persistent=False)
        self.position = nn.Parameter(torch.randn(1, DEFAULT_VOCAB.config.seq_len, HIDDEN) * 0.02)
        layer = nn.TransformerEncoderLayer(HIDDEN, 4, 4 * HIDDEN, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = sum(self.factors[n](getattr(self, f"t_{n}")[ids]) for n in FACTOR_NAMES) + self.position
        return self.layers(x)


class Renderer(nn.Module):
    """Embedder + connector (+ footprint projection) + SANA transformer: blueprint ids -> a diffusion Condition."""

    def __init__(self, footprint: bool) -> None:
        super().__init__()
        configs = tiny_parts_configs(vocab_size=0)
        spatial = configs["connector"]["spatial_channels"]
        self.footprint = nn.Linear(HIDDEN, spatial) if footprint else None
        extra = spatial + 2 if footprint else 0
        self.embedder = BlueprintEmbedder()
        self.connector = Connector(**{**configs["connector"], "num_positions": DEFAULT_VOCAB.config.seq_len})
        self.transformer = SanaTransformer2DModel(**{**configs["transformer"], "in_channels": configs["transformer"]["in_channels"] + extra})

    def condition(self, ids: torch.Tensor) -> Condition:
        h = self.embedder(ids)
        cells = h[:, 1 : 1 + GRID * GRID]
        spatial = self.connector.spatial_map(cells, LATENT_SIDE)
        if self.footprint is not None:
            spatial = torch.cat([spatial, self.footprint_map(ids, cells)], dim=1)
        return Condition(self.connector(h), spatial=spatial)

    def footprint_map(self, ids: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """(B, C + 2, 16, 16): inside each decoded object's box, its anchor state projected, and the latent cell's
        offset from the box centre divided by the half side."""
        b = ids.shape[0]
        out = cells.new_zeros(b, self.footprint.out_features + 2, LATENT_SIDE, LATENT_SIDE)
        proj = self.footprint(cells)  # (B, 64, C)
        step = 64 / LATENT_SIDE
        centres = (torch.arange(LATENT_SIDE, dtype=cells.dtype) + 0.5) * step
        for i, row in enumerate(ids.tolist()):
            scene = decode_tokens(row)
            boxes = [(o, o.size / 2, o.size / 2) for o in scene.objects] + ([(scene.text, scene.text.width / 2, scene.text.height / 2)] if scene.text else [])
            for obj, hw, hh in boxes:
                cell = anchor_of(obj.cx, obj.cy, DEFAULT_VOCAB.config)[0]
                rx, ry = (centres - obj.cx) / max(hw, 1.0), (centres - obj.cy) / max(hh, 1.0)
                inside = ((rx.abs() <= 1 + step / max(hw, 1.0))[None, :] & (ry.abs() <= 1 + step / max(hh, 1.0))[:, None]).to(cells.dtype)
                out[i, :-2] += proj[i, cell][:, None, None] * inside
                out[i, -2] += rx[None, :] * inside
                out[i, -1] += ry[:, None] * inside
        return out


def load_vae(path: str | None = None) -> AutoencoderDC:
    """A VAE folder, by default the bundled tiny's."""
    vae = AutoencoderDC.from_pretrained(path or resolve_model_path("tiny") / "vae", use_safetensors=True, torch_dtype=torch.float32)
    return vae.eval().requires_grad_(False)


def batches(batch_size: int, seed: int):
    """(ids, images) batches from the text-to-image stream (scenes the codec cannot write are skipped)."""
    stream = t2i_samples(seed, paraphrase_probability=0.0)
    while True:
        samples, ids = ModelStage.exact_blueprints(list(islice(stream, batch_size)))
        yield ids, images_to_tensor(np.stack([s["image"] for s in samples]))


def train(args: argparse.Namespace) -> Path:
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vae, model = load_vae(), Renderer(args.footprint)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(args.seed)
    start, step, log = time.time(), 0, []
    for ids, images in batches(args.batch_size, args.seed):
        with torch.no_grad():
            latents = encode_latents(vae, images)
        sigmas = training_sigmas(len(ids), g, torch.device("cpu"), torch.float32, "logit_normal")
        noise = randn_tensor(latents.shape, generator=g)
        cond = drop_condition(model.condition(ids), 0.1, g)
        pred = predict_velocity(model.transformer, noisy_latents(latents, noise, sigmas), cond, sigmas * 1000)
        loss = F.mse_loss(pred, noise - latents)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 100)
        opt.step()
        step += 1
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 1 - decay)
        elapsed = (time.time() - start) / 60
        if step % 20 == 0:
            log.append({"step": step, "minutes": round(elapsed, 2), "loss": loss.item()})
            print(json.dumps(log[-1]), flush=True)
        if step % 250 == 0 or elapsed >= args.minutes:
            save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, out / "ema.safetensors.tmp")
            (out / "ema.safetensors.tmp").replace(out / "ema.safetensors")
            (out / "train_log.json").write_text(json.dumps({"footprint": args.footprint, "batch_size": args.batch_size, "lr": args.lr,
                                                            "ema": args.ema, "steps": step, "log": log}, indent=1))
        if elapsed >= args.minutes:
            return out


@torch.no_grad()
def evaluate(args: argparse.Namespace, folder: Path) -> None:
    vae = load_vae()
    footprint = json.loads((folder / "train_log.json").read_text())["footprint"]
    model = Renderer(footprint)
    model.load_state_dict(load_file(folder / "ema.safetensors"))
    model.eval()
    prompts, counts = geneval_suite(args.per_category, seed=0)
    jobs = prompt_jobs(counts)
    rng = np.random.default_rng(args.seed)
    scenes = [sample_scene_for(prompts[i].requirement, rng, 64) for i in jobs]
    g = torch.Generator().manual_seed(args.seed)
    scheduler_config = FlowMatchEulerDiscreteScheduler.from_pretrained(resolve_model_path("tiny") / "scheduler").config
    outputs = []
    for s in range(0, len(jobs), 32):
        ids = torch.tensor([encode_scene(sc) for sc in scenes[s : s + 32]])
        latents = sample_latents(model.transformer, scheduler_config, model.condition(ids), (8, LATENT_SIDE, LATENT_SIDE),
                                 args.steps, args.guidance, g)
        outputs += list(tensor_to_images(decode_latents(vae, latents)))
    report(args, folder / f"geneval_true_blueprints_{args.per_category}.json", prompts, jobs, outputs, "true blueprints -> renderer")


def vae_ceiling(args: argparse.Namespace) -> None:
    vae = load_vae(args.vae)
    prompts, counts = geneval_suite(args.per_category, seed=0)
    jobs = prompt_jobs(counts)
    rng = np.random.default_rng(args.seed)
    images = np.stack([render(sample_scene_for(prompts[i].requirement, rng, 64)) for i in jobs])
    with torch.no_grad():
        rec = [tensor_to_images(decode_latents(vae, encode_latents(vae, images_to_tensor(images[s : s + 64])))) for s in range(0, len(images), 64)]
    name = f"geneval_vae_reconstructions_{args.per_category}" + (f"_{Path(args.vae).parent.name}" if args.vae else "")
    report(args, Path(args.out) / f"{name}.json", prompts, jobs, list(np.concatenate(rec)), f"VAE reconstructions ({args.vae or 'bundled tiny'})")


def report(args, path: Path, prompts, jobs, outputs, what: str) -> None:
    items = t2i_items(prompts, jobs, outputs)
    rows, summary = evaluate_t2i(items)
    print(f"{what}:\n{format_t2i_table(summary)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"what": what, "per_category": args.per_category, "seed": args.seed, "steps": args.steps,
                                "guidance": args.guidance, "summary": summary}, indent=1))
    save_png(path.with_suffix(".png"), t2i_grid(items, rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/semantic_renderer_probe", help="checkpoint and results folder")
    parser.add_argument("--minutes", type=float, default=35.0, help="training time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay of the sampling weights (horizon about 200 steps: runs are short)")
    parser.add_argument("--footprint", action=argparse.BooleanOptionalAction, default=True, help="the box footprint map")
    parser.add_argument("--per-category", type=int, default=50, help="GenEval prompts (images) per category")
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-only", metavar="FOLDER", help="evaluate this probe's checkpoint instead of training")
    parser.add_argument("--vae-ceiling", action="store_true", help="score the VAE's reconstructions instead")
    parser.add_argument("--vae", metavar="FOLDER", help="with --vae-ceiling: this VAE instead of the bundled tiny's")
    args = parser.parse_args()
    if args.vae_ceiling:
        vae_ceiling(args)
        return
    folder = Path(args.eval_only) if args.eval_only else train(args)
    evaluate(args, folder)


if __name__ == "__main__":
    main()
