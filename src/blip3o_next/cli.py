"""The `blip3o` command line. Thin: it parses arguments, calls the Python API, and prints results.

User errors (bad files, bad arguments) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from .fileio import InputError, check_writable_dir, save_png, write_json, write_jsonl
from .runtime import keep_freed_memory

log = logging.getLogger("blip3o")
MAX_STEPS = 1000  # diffusion steps; the sampler converges in tens, so more only burns time (the server caps at 100)


# ----------------------------------------------------------------------------- data


def _staging(out: Path) -> Path:
    """A temporary sibling folder; `_publish` renames it to `out` when everything is written."""
    check_writable_dir(out.parent if out.parent != Path("") else Path("."))
    if out.exists() and any(out.iterdir()) and not (out / "scores.json").is_file():
        raise InputError(f"{out}: exists and is not an earlier `blip3o data render` output; choose another --out")
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent if str(out.parent) else "."))


def _publish(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)


def cmd_data_render(args: argparse.Namespace) -> int:
    """Render canonical prompts (or edits), score the renders with the verifier, write files and a grid."""
    from .eval.suites import EditItem, T2IItem, edit_grid, evaluate_edits, evaluate_t2i, format_edit_table, format_t2i_table, t2i_grid
    from .shapeworld.degrade import DEGRADATIONS
    from .shapeworld.edits import edit_suite
    from .shapeworld.prompts import canonical_suite
    from .shapeworld.render import render
    from .shapeworld.sampler import sample_scene_for

    out = Path(args.out)
    staging = _staging(out)
    try:
        degrade = DEGRADATIONS[args.degrade].apply
        rng = np.random.default_rng(args.seed)
        if args.kind == "t2i":
            prompts = canonical_suite(args.per_category, seed=args.seed)
            items, records = [], []
            for i, p in enumerate(prompts):
                item_id = f"{i:04d}_{p.category}"
                image = degrade(render(sample_scene_for(p.requirement, rng, args.canvas)), rng)
                save_png(staging / "images" / f"{item_id}.png", image)
                records.append({"id": item_id, **p.to_dict()})
                items.append(T2IItem(item_id, p.text, p.category, p.requirement, [image], [out / "images" / f"{item_id}.png"]))
            write_jsonl(staging / "prompts.jsonl", records)
            rows, summary = evaluate_t2i(items)
            table, grid = format_t2i_table(summary), t2i_grid(items, rows)
        else:
            pairs = edit_suite(args.per_category, seed=args.seed, canvas=args.canvas)
            items, records = [], []
            for i, e in enumerate(pairs):
                item_id = f"{i:04d}_{e.spec.category}"
                source, target = render(e.source), degrade(render(e.target), rng)
                save_png(staging / "sources" / f"{item_id}.png", source)
                save_png(staging / "targets" / f"{item_id}.png", target)
                records.append({"id": item_id, "source": f"sources/{item_id}.png", **e.to_dict()})
                items.append(EditItem(item_id, e.instruction, e.spec, source, target, e.source, e.target))
            write_jsonl(staging / "edits.jsonl", records)
            rows, summary = evaluate_edits(items)
            table, grid = format_edit_table(summary), edit_grid(items, rows)
        write_json(staging / "scores.json", {"summary": summary, "items": rows})
        save_png(staging / "grid.png", grid)
        _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(table)
    what = "prompts.jsonl, images/" if args.kind == "t2i" else "edits.jsonl, sources/, targets/"
    print(f"\nwrote {out}/ ({what}, scores.json, grid.png)")
    return 0


def cmd_data_export(args: argparse.Namespace) -> int:
    from .shapeworld.dataset import export_shards

    try:
        paths = export_shards(args.out_dir, args.kind, args.n, seed=args.seed, canvas=args.canvas, shard_size=args.shard_size)
    except FileExistsError as e:
        raise InputError(str(e)) from None
    print(f"wrote {len(paths)} shard(s) with {args.n} {args.kind} samples to {args.out_dir}/")
    return 0


# ----------------------------------------------------------------------------- generate


def _load_pipeline(args: argparse.Namespace):
    import torch

    from .models.modeling import CheckpointError
    from .pipeline import Pipeline

    try:
        return Pipeline.from_pretrained(args.model, device=args.device, torch_dtype=getattr(torch, args.dtype),
                                        compile_transformer=args.compile, compile_ar=args.compile)
    except CheckpointError as e:
        raise InputError(str(e)) from None


def _check_can_edit(args: argparse.Namespace) -> None:
    """Fail fast, before loading any weights, when the model was not trained to edit."""
    from .models.modeling import CheckpointError, read_config
    from .pipeline import resolve_model_path

    try:
        editing = read_config(resolve_model_path(args.model)).editing
    except CheckpointError as e:
        raise InputError(str(e)) from None
    if not editing:
        raise InputError(f"{args.model}: this model was not trained to edit (no edit SFT)")


def _generation_kwargs(args: argparse.Namespace) -> dict:
    return {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        try:
            lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{args.prompts_file}: cannot read the prompts file ({e})") from None
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise InputError("no prompt given (pass PROMPT arguments or --prompts-file)")
    for i, p in enumerate(prompts):
        if not p.strip():
            raise InputError(f"prompt {i + 1} is empty")
    return prompts


def _output_paths(output: Path, count: int) -> list[Path]:
    """`out.png` for one image; `out_000.png`, `out_001.png`, ... for several."""
    suffix = output.suffix or ".png"
    if count == 1:
        return [output.with_suffix(suffix)]
    return [output.with_name(f"{output.stem}_{i:03d}{suffix}") for i in range(count)]


def _blueprint_path(image_path: Path) -> Path:
    """Where --show-blueprint writes the preview of the image at `image_path`."""
    return image_path.with_name(f"{image_path.stem}_blueprint.png")


def _check_outputs(args: argparse.Namespace, count: int) -> None:
    """Fail before any work if an output cannot be written: its folder is not writable, or the path is a folder."""
    output = Path(args.output)
    check_writable_dir(output.parent if str(output.parent) else Path("."))
    paths = _output_paths(output, count)
    if args.show_blueprint:
        paths += [_blueprint_path(path) for path in paths]
    if args.grid:
        check_writable_dir(Path(args.grid).parent)
        paths.append(Path(args.grid))
    for path in paths:
        if path.is_dir():
            raise InputError(f"{path}: is a folder; give a file name for the output")


def _write_outputs(args: argparse.Namespace, labels: list[str], out, grid_cells: list[list[np.ndarray]]) -> None:
    """Each image (and with --show-blueprint its blueprint preview), the optional grid, and where they went."""
    from .viz import image_grid

    written = []
    for path, image, preview in zip(_output_paths(Path(args.output), len(labels)), out.images, out.blueprint_previews):
        save_png(path, image)
        written.append(path)
        if args.show_blueprint:
            save_png(_blueprint_path(path), preview)
    if args.grid:
        save_png(args.grid, image_grid(grid_cells, labels, tile=128, columns=4))
    where = str(written[0]) if len(written) == 1 else f"{written[0]} ... {written[-1]} ({len(written)} images)"
    print(f"wrote {where}" + (" with *_blueprint.png previews" if args.show_blueprint else "") + (f" and the grid {args.grid}" if args.grid else ""))


def cmd_generate(args: argparse.Namespace) -> int:
    prompts = _read_prompts(args)
    jobs = [p for p in prompts for _ in range(args.num_images)]
    _check_outputs(args, len(jobs))
    pipe = _load_pipeline(args)
    out = pipe.generate_in_batches(jobs, args.batch_size, args.seed, **_generation_kwargs(args))
    cells = [[np.asarray(i), np.asarray(b)] if args.show_blueprint else [np.asarray(i)] for i, b in zip(out.images, out.blueprint_previews)]
    _write_outputs(args, jobs, out, cells)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import torch

    from .models.modeling import CheckpointError
    from .models.released_checkpoint import convert_released

    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        raise InputError(f"{args.out}: exists and is not empty; choose another OUT or pass --overwrite")
    try:
        model = convert_released(args.path, args.out, ta_tok=args.ta_tok, siglip=args.siglip, diffusion=args.diffusion,
                                 torch_dtype=getattr(torch, args.dtype) if args.dtype else None)
    except CheckpointError as e:
        raise InputError(str(e)) from None
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in model.named_children()}
    print(f"wrote {args.out}: " + ", ".join(f"{name} {n / 1e6:.1f}M" for name, n in counts.items()))
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from .fileio import load_image

    if not args.instruction.strip():
        raise InputError("the instruction is empty")
    source = load_image(args.image)  # a corrupted or non-image file fails here, before the model loads
    _check_outputs(args, args.num_images)
    _check_can_edit(args)
    pipe = _load_pipeline(args)
    jobs = [args.instruction] * args.num_images
    out = pipe.generate_in_batches(jobs, args.batch_size, args.seed, reference_images=[source] * len(jobs), preserve_unchanged=args.preserve,
                                   **_generation_kwargs(args))
    reference = pipe.reference_array(source)
    _write_outputs(args, jobs, out, [[reference, np.asarray(i)] for i in out.images])
    return 0


# ----------------------------------------------------------------------------- eval


def _check_report_paths(args: argparse.Namespace) -> None:
    """Fail before any work if a report cannot be written."""
    for path in (args.grid, args.json if args.json not in (None, "-") else None):
        if path is not None:
            check_writable_dir(Path(path).parent)


def _write_reports(args: argparse.Namespace, summary: dict, rows: list, grid) -> None:
    if args.json:
        payload = {"summary": summary, "items": rows}
        if args.json == "-":
            print(json.dumps(payload, indent=2))
        else:
            write_json(args.json, payload)
            print(f"wrote {args.json}")
    save_png(args.grid, grid)
    print(f"wrote {args.grid}")


def cmd_eval_t2i(args: argparse.Namespace) -> int:
    from .eval.suites import evaluate_t2i, format_t2i_table, load_t2i_items, t2i_grid

    _check_report_paths(args)
    items = load_t2i_items(args.prompts, args.images_dir)  # every input is checked before any scoring
    rows, summary = evaluate_t2i(items)
    print(format_t2i_table(summary))
    _write_reports(args, summary, rows, t2i_grid(items, rows))
    return 0


def cmd_eval_edit(args: argparse.Namespace) -> int:
    from .eval.suites import edit_grid, evaluate_edits, format_edit_table, load_edit_items

    _check_report_paths(args)
    items = load_edit_items(args.edits, args.out_dir)
    rows, summary = evaluate_edits(items)
    print(format_edit_table(summary))
    _write_reports(args, summary, rows, edit_grid(items, rows))
    return 0


def cmd_eval_geneval(args: argparse.Namespace) -> int:
    from .eval.suites import evaluate_t2i, format_t2i_table, generate_t2i_items, geneval_suite, plan_summary, t2i_grid

    _check_report_paths(args)
    pipe = _load_pipeline(args)
    prompts, counts = geneval_suite(args.per_category, seed=args.suite_seed)
    items = generate_t2i_items(pipe, prompts, counts, seed=args.seed, batch_size=args.batch_size, blueprint_only=args.decode == "blueprint",
                               **_generation_kwargs(args))
    rows, summary = evaluate_t2i(items)
    names = ("model", "decode", "per_category", "suite_seed", "seed", "batch_size", "steps", "guidance", "temperature", "top_k", "top_p",
             "dtype", "compile")
    summary["settings"] = {k: getattr(args, k) for k in names}
    if pipe.model.semantic:
        summary["plan"] = plan_summary(items)
        print("plan score (the blueprints decoded to scenes and checked against their prompts; no diffusion):")
        print(format_t2i_table(summary["plan"]))
        print("images:")
    print(format_t2i_table(summary))
    _write_reports(args, summary, rows, t2i_grid(items, rows))
    return 0


def cmd_eval_imgedit(args: argparse.Namespace) -> int:
    from .eval.suites import edit_grid, edit_plan_summary, evaluate_edits, format_edit_table, generate_edit_items
    from .shapeworld.edits import edit_suite

    _check_report_paths(args)
    _check_can_edit(args)
    pipe = _load_pipeline(args)
    items = generate_edit_items(pipe, edit_suite(args.per_category, seed=args.suite_seed), seed=args.seed, batch_size=args.batch_size,
                                preserve_unchanged=args.preserve, **_generation_kwargs(args))
    rows, summary = evaluate_edits(items)
    names = ("model", "per_category", "suite_seed", "seed", "batch_size", "steps", "guidance", "temperature", "top_k", "top_p", "preserve",
             "dtype", "compile")
    summary["settings"] = {k: getattr(args, k) for k in names}
    if pipe.model.semantic:
        summary["plan"] = edit_plan_summary(items)
        print("plan score (the edits' blueprints decoded to scenes and checked against source and instruction; no diffusion):")
        print(format_edit_table(summary["plan"]))
        print("images:")
    print(format_edit_table(summary))
    _write_reports(args, summary, rows, edit_grid(items, rows))
    return 0


# ----------------------------------------------------------------------------- train


def cmd_train(args: argparse.Namespace) -> int:
    from .models.modeling import CheckpointError
    from .training.recipes import Recipe, is_recipe, run_recipe, train_stage_file

    try:
        if args.kind is None and is_recipe(args.config):
            if args.output_dir or args.steps or args.init_from:
                raise InputError(f"{args.config}: --output-dir, --steps and --init-from apply to one stage, not to a recipe")
            timings = run_recipe(Recipe.from_yaml(args.config))
            print("finished: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in timings.items()) + f"; total {sum(timings.values()) / 60:.1f} min")
            return 0
        # `grpo` also runs a file without `stage: grpo`, whose settings GRPOConfig then checks.
        out = train_stage_file(args.config, args.kind, output_dir=args.output_dir, steps=args.steps, init_from=args.init_from)
    except CheckpointError as e:  # e.g. init_from names a folder that is not a model
        raise InputError(str(e)) from None
    print(f"wrote {out}/ (checkpoints, final/, metrics.csv, curves and sample grids, tensorboard/; GRPO: before/after evaluation)")
    return 0


# ----------------------------------------------------------------------------- serve


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model once, then serve the web page and the JSON API until interrupted."""
    try:
        from .serving.server import ServerConfig, serve, served_host_names
    except ImportError as e:
        raise InputError(f"the server needs gradio and uvicorn ({e}); install them with: python3 -m pip install -e .") from None
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        config = ServerConfig(
            queue_size=args.queue_size, timeout_s=args.timeout, max_body_bytes=int(args.max_body_mb * 2**20),
            max_image_side=args.max_image_side, max_prompt_chars=args.max_prompt_chars, max_num_images=args.max_images,
            default_steps=args.steps, default_guidance=args.guidance, model_name=str(args.model), ui=not args.no_ui,
            allowed_hosts=served_host_names(args.host, args.allowed_host), allowed_origins=tuple(args.allowed_origin),
        )
    except ValueError as e:
        raise InputError(f"serve: {e}") from None
    pipe = _load_pipeline(args)
    print(f"serving {args.model} on http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}/ "
          f"(web page at /, API at /api/generate and /api/edit, health at /health); Ctrl-C stops", flush=True)
    serve(pipe, config, host=args.host, port=args.port, log_level="info" if args.verbose else "warning")
    return 0


# ----------------------------------------------------------------------------- parser


def _canvas(value: str) -> int:
    from .shapeworld.world import MAX_CANVAS, MIN_CANVAS

    try:
        s = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if not MIN_CANVAS <= s <= MAX_CANVAS:
        raise argparse.ArgumentTypeError(f"canvas size must be in [{MIN_CANVAS}, {MAX_CANVAS}], got {s}")
    return s


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {value!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _non_negative(value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
    if not math.isfinite(x) or x < 0:  # inf guidance gives a black image, inf temperature noise: refuse both
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return x


def _steps(value: str) -> int:
    n = _positive(value)
    if n > MAX_STEPS:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_STEPS}], got {n}")
    return n


def _probability(value: str) -> float:
    x = _non_negative(value)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return x


def _port(value: str) -> int:
    n = _positive(value) if value != "0" else 0
    if n > 65535:
        raise argparse.ArgumentTypeError(f"port must be in [0, 65535], got {n}")
    return n


def _positive_float(value: str) -> float:
    x = _non_negative(value)
    if x == 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return x


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones: their help already says what happens (e.g. "default: the model's")."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Argument errors as one line and exit status 2 (argparse's default prints the whole usage)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _add_report_args(parser: argparse.ArgumentParser, kind: str, shown: str) -> None:
    parser.add_argument("--json", metavar="FILE", help="also write per-item results and the summary as JSON ('-' for stdout)")
    parser.add_argument("--grid", metavar="FILE", default=f"eval_{kind}_grid.png", help=f"PNG grid of {shown} marked pass/fail")


def _add_output_args(parser: argparse.ArgumentParser, default: str, per_input: str, grid: str) -> None:
    parser.add_argument("-o", "--output", default=default, help="output PNG; with several images, FILE_000.png, FILE_001.png, ...")
    parser.add_argument("-n", "--num-images", type=_positive, default=1, help=per_input)
    parser.add_argument("--grid", metavar="FILE", help=f"also write a PNG grid of {grid}")
    parser.add_argument("--show-blueprint", action="store_true", help="also save each blueprint's decoded preview as *_blueprint.png")


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", help="the bundled model name (tiny: generates and edits) or a checkpoint folder")
    parser.add_argument("--seed", type=int, default=0, help="random seed (batch k uses seed + k)")
    parser.add_argument("--batch-size", type=_positive, default=16, help="images generated together")
    parser.add_argument("--steps", type=_steps, help=f"diffusion steps, 1-{MAX_STEPS} (default: the model's)")
    parser.add_argument("--guidance", type=_non_negative, help="classifier-free guidance scale (default: the model's)")
    parser.add_argument("--temperature", type=_non_negative, help="AR sampling temperature; 0 = greedy (default: the model's; for edits its edit_temperature when set)")
    parser.add_argument("--top-k", type=_positive, help="AR top-k (default: the model's)")
    parser.add_argument("--top-p", type=_probability, help="AR nucleus top-p in (0, 1] (default: the model's)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    _add_speed_args(parser)


def _add_preserve_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preserve", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the image where the edit's blueprint keeps the reference's tokens, and redraw only the rest "
                             "(blended latent diffusion, plus the reference's own pixels there with the model's edit_paste_unchanged; "
                             "default: the model's edit_preserve_unchanged; both on for tiny)")


def _add_speed_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and compute; bfloat16 ran 1.3-2x faster on a CPU with AVX-512 BF16 and scored like float32 "
                             "(GenEval of a VQ-blueprint model 0.264 vs 0.263; edit success of a VQ-blueprint edit model with --no-preserve 0.122 vs 0.119), but its images differ in detail")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the AR step and the diffusion transformer: faster images after a one-off compilation "
                             "of tens of seconds per batch size; worth it for many images, not for one")


def build_parser() -> argparse.ArgumentParser:
    from .shapeworld.degrade import DEGRADATIONS

    fmt = _DefaultsFormatter
    parser = _Parser(prog="blip3o", description="BLIP3o-NEXT: training, the ShapeWorld data engine, verifier and scorers.", formatter_class=fmt)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    data = commands.add_parser("data", help="render or export ShapeWorld data", formatter_class=fmt)
    data_cmds = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    render = data_cmds.add_parser(
        "render",
        help="render canonical prompts (or edits), score them with the verifier, write images, a grid and scores",
        description="Render the canonical suite's ground truth, score it with the verifier, and write files plus a grid.",
        formatter_class=fmt,
    )
    render.add_argument("--kind", choices=("t2i", "edit"), default="t2i", help="text-to-image prompts or edit pairs")
    render.add_argument("--per-category", type=_positive, default=4, help="prompts (or edits) per category")
    render.add_argument("--canvas", type=_canvas, default=64, help="canvas size S in px")
    render.add_argument("--seed", type=int, default=0, help="random seed (prompt choice and scenes)")
    render.add_argument("--degrade", choices=tuple(DEGRADATIONS), default="clean", help="degrade the scored images (t2i images or edit targets)")
    render.add_argument("--out", default="samples", help="output folder (replaced if it is an earlier render output)")
    render.set_defaults(func=cmd_data_render)

    export = data_cmds.add_parser(
        "export", help="export training samples as WebDataset tar shards (png + json)", formatter_class=fmt,
        description="Write N samples from the data engine to WebDataset shards in OUT_DIR (must be new or empty).",
    )
    export.add_argument("out_dir", metavar="OUT_DIR", help="folder for the .tar shards")
    export.add_argument("--kind", choices=("t2i", "edit"), default="t2i", help="text-to-image samples or edit pairs")
    export.add_argument("--n", type=_positive, default=1000, help="number of samples")
    export.add_argument("--canvas", type=_canvas, default=64, help="canvas size S in px")
    export.add_argument("--seed", type=int, default=0, help="random seed")
    export.add_argument("--shard-size", type=_positive, default=1000, help="samples per shard")
    export.set_defaults(func=cmd_data_export)

    tr = commands.add_parser(
        "train", help="run a training stage (image_tokenizer, semantic_tokenizer, vae, pretrain, sft, edit_sft, grpo) or a whole recipe from YAML", formatter_class=fmt,
        description="Train one stage, or a recipe of stages (e.g. configs/tiny/recipe.yaml trains the semantic-blueprint "
        "text-to-image model from scratch; configs/tiny/rl_recipe.yaml then tunes it with GRPO; configs/tiny/edit_recipe.yaml "
        "then teaches it editing, which gives the bundled tiny). Each stage "
        "resumes from the newest checkpoint in its output folder. Runs under `accelerate launch` or `torchrun` for several "
        "processes. `blip3o train grpo --config CONFIG` runs reinforcement learning (GRPO on the AR model; settings: "
        "blip3o_next.training.grpo.GRPOConfig): configs/tiny/6_semantic_grpo.yaml tunes a semantic-blueprint model on plan rewards "
        "(no diffusion in the rollouts), configs/tiny/6_grpo.yaml a VQ-blueprint model on rendered images with verifier "
        "rewards, configs/tiny/7_edit_grpo.yaml (`task: edit`) an edit model's edit AR model with edit rewards. "
        "An sft config with `lora: {rank: 16, alpha: 32, parts: [ar, transformer]}` trains LoRA adapters only (peft; "
        "configs/tiny/ablations/lora_sft.yaml): final/ is then the merged model, final/adapters/<part>/ the adapters. "
        "`data: shards/{00000..00099}.tar` (a folder, glob or brace pattern) trains on your own WebDataset shards in "
        "img2dataset's layout (image + txt caption, or json 'caption'; edit_sft: source.<ext> + target.<ext> + instruction) "
        "instead of the data engine (configs/tiny/ablations/own_data_sft.yaml).",
    )
    tr.add_argument("kind", nargs="?", choices=("grpo",), help="grpo: reinforcement learning (also chosen by `stage: grpo` in the YAML)")
    tr.add_argument("--config", required=True, metavar="YAML",
                    help="a stage's settings (fields of blip3o_next.training.trainer.TrainConfig, or GRPOConfig for grpo) or a recipe (a `stages:` list)")
    tr.add_argument("--output-dir", help="override the config's output_dir")
    tr.add_argument("--steps", type=_positive, help="override the config's number of steps")
    tr.add_argument("--init-from", metavar="MODEL", help="override the config's init_from: the model to start from (a bundled name such as tiny, or a folder)")
    tr.set_defaults(func=cmd_train)

    gen = commands.add_parser(
        "generate", help="generate images from text prompts (default: the bundled tiny model)", formatter_class=fmt,
        description="Text-to-image generation: the AR model writes a blueprint of image tokens, the diffusion model renders it. "
        'Example: blip3o generate "a photo of a red circle left of a blue star" -o out.png',
    )
    gen.add_argument("prompts", nargs="*", metavar="PROMPT", help="text prompt(s)")
    gen.add_argument("--prompts-file", metavar="FILE", help="also read prompts from FILE, one per line")
    _add_output_args(gen, "out.png", "images per prompt", "all images (with blueprints if --show-blueprint)")
    _add_model_args(gen)
    gen.set_defaults(func=cmd_generate)

    edit_cmd = commands.add_parser(
        "edit", help="edit an image by an instruction (default: the bundled tiny model)", formatter_class=fmt,
        description="Image editing: the AR model reads the instruction and the image's tokens and writes the edited blueprint; "
        "the diffusion model renders it from the image's latents. Images of another size are resized to the model's, with a "
        'notice. Example: blip3o edit in.png "make the red circle blue" -o out.png',
    )
    edit_cmd.add_argument("image", metavar="IN.png", help="the image to edit (any mode: grayscale, RGBA and paletted images are converted)")
    edit_cmd.add_argument("instruction", metavar="INSTRUCTION", help='what to change, in the canonical forms: "add a red circle left of the blue star", '
                          '"remove the blue star", "replace the blue star with a red circle", "make the blue star red", "move the blue '
                          'star to the top left", "make the blue star bigger", "change the background to black", \'change the text to '
                          '"WORD"\', "keep the image unchanged"')
    _add_output_args(edit_cmd, "edited.png", "outputs (different samples of the same edit)", "source | output pairs")
    _add_model_args(edit_cmd)
    _add_preserve_arg(edit_cmd)
    edit_cmd.set_defaults(func=cmd_edit)

    conv = commands.add_parser(
        "convert", help="convert an official BLIP3o-NEXT release folder to this project's checkpoint layout", formatter_class=fmt,
        description="Read a folder in the official BLIP3o-NEXT release layout (config.json, model.safetensors[.index.json], "
        "tokenizer) and write it as this project's checkpoint: one folder per part, safetensors + JSON only. Every tensor "
        "is mapped and its shape checked before any weight is read; a missing, unexpected or misshapen tensor stops the "
        "conversion with the file and key named. Nothing is downloaded: the TA-Tok file and the SigLIP2 and SANA 1.5 "
        "folders (configs only) must be local. Example: blip3o convert BLIP3o-NEXT-SFT-3B next-sft --ta-tok ta_tok.pth "
        "--siglip siglip2-so400m-patch14-384 --diffusion SANA1.5_1.6B_1024px_diffusers",
    )
    conv.add_argument("path", type=Path, metavar="PATH", help="the released model folder")
    conv.add_argument("out", type=Path, metavar="OUT", help="output folder (this project's layout)")
    conv.add_argument("--ta-tok", required=True, metavar="FILE",
                      help="TA-Tok weights: the official ta_tok.pth (read with torch.load(weights_only=True)) or a .safetensors file "
                           "with its args as JSON metadata; the release's own copy of the tokenizer, when it has one, takes precedence")
    conv.add_argument("--siglip", metavar="FOLDER", help="local SigLIP2 so400m-patch14-384 folder, config.json only (default: ta_tok.pth's teacher when it is a local folder)")
    conv.add_argument("--diffusion", metavar="FOLDER",
                      help="local SANA 1.5 diffusers folder whose transformer/, vae/ and scheduler/ configs are read "
                           "(default: config.json's diffusion_name_or_path when it is a local folder)")
    conv.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast the weights (default: as stored)")
    conv.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    conv.set_defaults(func=cmd_convert)

    srv = commands.add_parser(
        "serve", help="serve the web demo and the HTTP JSON API (default: the bundled tiny model on 127.0.0.1:7860)",
        formatter_class=fmt,
        description="Load the model once and serve a web page (text to image and edit tabs) plus a JSON API on one local "
        "server: POST /api/generate, POST /api/edit, GET /health. Requests run one at a time; at most --queue-size wait, "
        "later ones get 429. Example: blip3o serve --port 7860, then open http://127.0.0.1:7860/",
    )
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (anything but loopback exposes an unauthenticated server)")
    srv.add_argument("--port", type=_port, default=7860, help="TCP port")
    srv.add_argument("--model", default="tiny", help="the bundled model name (tiny: generates and edits) or a checkpoint folder")
    srv.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    _add_speed_args(srv)
    srv.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's choice)")
    srv.add_argument("--queue-size", type=int, default=16, help="requests that may wait behind the running one; beyond that: 429")
    srv.add_argument("--timeout", type=_positive_float, default=300.0, help="seconds a request may wait and run; beyond that: 504")
    srv.add_argument("--max-body-mb", type=_positive_float, default=16.0, help="largest request body or upload, in MiB; beyond that: 413")
    srv.add_argument("--max-image-side", type=_positive, default=4096, help="largest uploaded image side in px; beyond that: 413")
    srv.add_argument("--max-prompt-chars", type=_positive, default=1000, help="longest prompt or instruction; beyond that: 422")
    srv.add_argument("--max-images", type=_positive, default=8, help="most images per request")
    srv.add_argument("--steps", type=_steps, help=f"default diffusion steps when a request sets none, 1-{MAX_STEPS} (default: the model's)")
    srv.add_argument("--guidance", type=_non_negative, help="default guidance scale when a request sets none (default: the model's)")
    srv.add_argument("--no-ui", action="store_true", help="serve the JSON API only, without the web page")
    srv.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                     help="a Host name clients may use besides localhost, 127.0.0.1, ::1 and the --host address (repeatable; "
                          "'*' allows any, which also allows DNS rebinding)")
    srv.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                     help="a web origin (e.g. https://app.example.com) whose pages may call this server from a browser "
                          "(repeatable; by default only the server's own page may)")
    srv.set_defaults(func=cmd_serve)

    ev = commands.add_parser("eval", help="score images with the verifier", formatter_class=fmt)
    ev_cmds = ev.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    geneval = ev_cmds.add_parser(
        "geneval", help="generate the GenEval-ShapeWorld suite with a model and score it", formatter_class=fmt,
        description="Generate the fixed canonical suite (all 8 categories, at least --per-category images each, fixed seeds), "
        "score every image with the verifier, print the per-category table and overall (mean of the six GenEval categories).",
    )
    geneval.add_argument("--per-category", type=_positive, default=50, help="prompts (at least images) per category")
    geneval.add_argument("--suite-seed", type=int, default=0, help="which fixed suite of prompts")
    geneval.add_argument("--decode", choices=("diffusion", "blueprint"), default="diffusion",
                         help="score the diffusion output, or the image tokenizer's decoding of the AR blueprint (no-diffusion ablation)")
    _add_model_args(geneval)
    _add_report_args(geneval, "geneval", "images")
    geneval.set_defaults(func=cmd_eval_geneval)
    imgedit = ev_cmds.add_parser(
        "imgedit", help="carry out the ImgEdit-ShapeWorld suite with a model and score it", formatter_class=fmt,
        description="Edit the fixed canonical suite (all 9 edit categories, keep included, --per-category pairs each, fixed "
        "seeds), score every output with the verifier: success per category, mean consistency PSNR outside the edited "
        "objects, and the share of successes with PSNR >= 30 dB.",
    )
    imgedit.add_argument("--per-category", type=_positive, default=30, help="edit pairs per category")
    imgedit.add_argument("--suite-seed", type=int, default=0, help="which fixed suite of edit pairs")
    _add_model_args(imgedit)
    _add_preserve_arg(imgedit)
    _add_report_args(imgedit, "imgedit", "source | output pairs")
    imgedit.set_defaults(func=cmd_eval_imgedit)
    t2i = ev_cmds.add_parser(
        "t2i", help="GenEval-style scoring of text-to-image outputs", formatter_class=fmt,
        description="Score IMAGES_DIR/<id>.png (or IMAGES_DIR/<id>/*.png) against PROMPTS.jsonl lines "
        '{"id", "prompt", optional "category", optional "requirement"}.',
    )
    t2i.add_argument("prompts", metavar="PROMPTS.jsonl", help="prompt file")
    t2i.add_argument("images_dir", metavar="IMAGES_DIR", help="folder of generated images")
    _add_report_args(t2i, "t2i", "images")
    t2i.set_defaults(func=cmd_eval_t2i)
    edit = ev_cmds.add_parser(
        "edit", help="ImgEdit-style scoring of edit outputs", formatter_class=fmt,
        description="Score OUT_DIR/<id>.png against EDITS.jsonl lines "
        '{"id", "instruction", "source" (path relative to the JSONL), optional "source_scene", optional "target_scene"}.',
    )
    edit.add_argument("edits", metavar="EDITS.jsonl", help="edit file")
    edit.add_argument("out_dir", metavar="OUT_DIR", help="folder of edited images")
    _add_report_args(edit, "edit", "source | output pairs")
    edit.set_defaults(func=cmd_eval_edit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except InputError as e:
        print(f"blip3o: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blip3o: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
