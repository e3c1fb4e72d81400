"""What each `blip3o` command does (`cmd_*`, one per subcommand), on arguments that `cli.py` parsed: it calls the
Python API, writes the outputs atomically and prints results. Input errors raise InputError, which `cli.main` prints
as one line."""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from .fileio import InputError, check_writable_dir, save_png, write_json, write_jsonl

log = logging.getLogger("blip3o")


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
    return {"num_inference_steps": args.steps, "guidance_scale": args.guidance, "temperature": args.temperature,
            "id_temperature": args.id_temperature, "best_of": args.best_of, "top_k": args.top_k, "top_p": args.top_p}


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


def _report_suite(args: argparse.Namespace, own_settings: tuple[str, ...], summary: dict, plan: dict | None, plan_meaning: str, table) -> None:
    """Record the run's settings (and the plan score, for a semantic model) in `summary` and print its tables."""
    names = ("model", *own_settings, "per_category", "suite_seed", "seed", "batch_size", "steps", "guidance", "temperature", "id_temperature", "best_of", "top_k", "top_p",
             "dtype", "compile")
    summary["settings"] = {k: getattr(args, k) for k in names}
    if plan is not None:
        summary["plan"] = plan
        print(f"plan score ({plan_meaning}; no diffusion):")
        print(table(plan))
        print("images:")
    print(table(summary))


def cmd_eval_geneval(args: argparse.Namespace) -> int:
    from .eval.suites import evaluate_t2i, format_t2i_table, generate_t2i_items, geneval_suite, plan_summary, t2i_grid

    _check_report_paths(args)
    pipe = _load_pipeline(args)
    prompts, counts = geneval_suite(args.per_category, seed=args.suite_seed)
    items = generate_t2i_items(pipe, prompts, counts, seed=args.seed, batch_size=args.batch_size, blueprint_only=args.decode == "blueprint",
                               **_generation_kwargs(args))
    rows, summary = evaluate_t2i(items)
    plan = plan_summary(items) if pipe.model.semantic else None
    _report_suite(args, ("decode",), summary, plan, "the blueprints decoded to scenes and checked against their prompts", format_t2i_table)
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
    plan = edit_plan_summary(items) if pipe.model.semantic else None
    _report_suite(args, ("preserve",), summary, plan, "the edits' blueprints decoded to scenes and checked against source and instruction",
                  format_edit_table)
    _write_reports(args, summary, rows, edit_grid(items, rows))
    return 0


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


def cmd_serve(args: argparse.Namespace) -> int:
    """Load the model once, then serve the web page and the JSON API until interrupted."""
    try:
        from .serving.config import ServerConfig
        from .serving.server import serve, served_host_names
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
