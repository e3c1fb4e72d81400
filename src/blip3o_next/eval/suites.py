"""Evaluation over files: prompt/edit JSONL + image folders -> per-image results, summary tables and grids.

Every input is read and checked before anything is scored, so bad input fails fast with a one-line
`InputError` (file and line) and nothing is written.

PROMPTS.jsonl, one object per line:
    id          (required) image file stem: IMAGES_DIR/<id>.png, or a folder IMAGES_DIR/<id>/ of samples
    prompt      (required) canonical prompt text (ShapeWorld v1, `shapeworld.prompts`)
    category    (optional) one of the eight categories; omitted -> "custom" (not in the GenEval overall)
    requirement (optional) structured requirement; omitted -> parsed from the prompt
EDITS.jsonl, one object per line:
    id           (required) output file stem: OUT_DIR/<id>.png
    instruction  (required) canonical edit instruction
    source       (required) path of the source image, relative to the JSONL file's folder
    source_scene (optional) ground-truth source scene; omitted -> the verifier parses the source image
    target_scene (optional) one expected target scene, used only to widen the consistency mask
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..fileio import InputError, load_square_image, read_jsonl
from .scorers import EditResult, T2IResult, check_edit, check_t2i, summarize_edits, summarize_t2i
from ..shapeworld.edits import EditError, EditSpec, parse_instruction
from ..shapeworld.prompts import PromptParseError, Requirement, parse_prompt
from ..shapeworld.world import MAX_CANVAS, MIN_CANVAS, Scene
from .verifier import SceneParser
from ..viz import image_grid

GRID_LIMIT = 256  # cells; larger evaluations show the first ones


@dataclass
class T2IItem:
    id: str
    prompt: str
    category: str
    requirement: Requirement
    images: list[np.ndarray]
    paths: list[Path]
    blueprints: list[np.ndarray] | None = None  # the AR model's blueprint of each image, when generated here


@dataclass
class EditItem:
    id: str
    instruction: str
    spec: EditSpec
    source_image: np.ndarray
    output_image: np.ndarray
    source_scene: Scene | None
    target_scene: Scene | None
    blueprint: np.ndarray | None = None  # the blueprint the AR model wrote for the edit, when generated here


def _check_canvas(path: Path, img: np.ndarray) -> np.ndarray:
    if not MIN_CANVAS <= img.shape[0] <= MAX_CANVAS:
        raise InputError(f"{path}: image is {img.shape[0]} px; ShapeWorld canvases are {MIN_CANVAS}-{MAX_CANVAS} px")
    return img


def _image_paths(images_dir: Path, item_id: str, where: str) -> list[Path]:
    single = images_dir / f"{item_id}.png"
    folder = images_dir / item_id
    if single.is_file():
        return [single]
    if folder.is_dir():
        paths = sorted(folder.glob("*.png"))
        if paths:
            return paths
    raise InputError(f"{where}: no image for id {item_id!r} ({single} or {folder}/*.png)")


def load_t2i_items(prompts_path: str | Path, images_dir: str | Path) -> list[T2IItem]:
    prompts_path, images_dir = Path(prompts_path), Path(images_dir)
    if not images_dir.is_dir():
        raise InputError(f"{images_dir}: no such folder")
    items = []
    for lineno, rec in enumerate(read_jsonl(prompts_path, required=("id", "prompt")), start=1):
        where = f"{prompts_path}:{lineno}"
        try:
            req = Requirement.from_dict(rec["requirement"]) if rec.get("requirement") else parse_prompt(str(rec["prompt"]))
        except (PromptParseError, ValueError, TypeError) as e:
            raise InputError(f"{where}: {e}") from None
        paths = _image_paths(images_dir, str(rec["id"]), where)
        images = [_check_canvas(p, load_square_image(p)) for p in paths]
        items.append(T2IItem(str(rec["id"]), str(rec["prompt"]), str(rec.get("category", "custom")), req, images, paths))
    return items


def evaluate_t2i(items: Sequence[T2IItem], parser: SceneParser | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Score every image of every prompt; returns per-image rows and the summary."""
    parser = parser or SceneParser()
    flat = [(item, img, path) for item in items for img, path in zip(item.images, item.paths)]
    scenes = parse_images([img for _, img, _ in flat], parser)
    rows, results = [], []
    for (item, _, path), scene in zip(flat, scenes):
        r: T2IResult = check_t2i(item.requirement, scene)
        results.append(r)
        rows.append(
            {"id": item.id, "prompt": item.prompt, "category": item.category, "image": str(path), "passed": r.passed,
             "partial": r.partial, "ocr": r.ocr, "reasons": r.reasons, "parsed": scene.to_dict()}
        )
    return rows, summarize_t2i([row["category"] for row in rows], results)


def geneval_suite(per_category: int, seed: int = 0) -> tuple[list, list[int]]:
    """The fixed GenEval-ShapeWorld suite: canonical prompts and how many images each gets.

    Categories with fewer distinct prompts than `per_category` (e.g. single objects: one per shape) give each
    prompt more images, so every category is scored on at least `per_category` images.
    """
    from ..shapeworld.prompts import canonical_suite

    prompts = canonical_suite(per_category, seed=seed)
    sizes = {c: sum(p.category == c for p in prompts) for c in {p.category for p in prompts}}
    return prompts, [-(-per_category // sizes[p.category]) for p in prompts]


def generate_t2i_items(
    pipe, prompts: Sequence, images_per_prompt: Sequence[int], seed: int = 0, batch_size: int = 16, progress: bool = True,
    blueprint_only: bool = False, **generate_kwargs
) -> list[T2IItem]:
    """Generate images for canonical prompts (shapeworld.prompts.Prompt) with a Pipeline.

    Batch k is drawn with seed `seed + k`, so a run is reproducible for the same batch size. `blueprint_only`
    keeps the image tokenizer's decoding of the AR tokens instead of the diffusion output (the no-diffusion
    ablation; the diffusion then runs a single step, since its output is discarded).
    """
    if blueprint_only:
        generate_kwargs["num_inference_steps"] = 1
    jobs = prompt_jobs(images_per_prompt)
    out = pipe.generate_in_batches([prompts[i].text for i in jobs], batch_size, seed, progress, **generate_kwargs)
    return t2i_items(prompts, jobs, out.blueprint_previews if blueprint_only else out.images, out.blueprints.numpy())


def prompt_jobs(images_per_prompt: Sequence[int]) -> list[int]:
    """The prompt index of each image to make, in generation order."""
    return [i for i, n in enumerate(images_per_prompt) for _ in range(n)]


def t2i_items(prompts: Sequence, jobs: Sequence[int], images: Sequence, blueprints: Sequence | None = None) -> list[T2IItem]:
    """Group generated images (one per job, PIL or arrays), and their blueprints if given, by their canonical
    prompt, ready to score."""
    grouped: dict[int, list[np.ndarray]] = {i: [] for i in range(len(prompts))}
    plans: dict[int, list[np.ndarray]] = {i: [] for i in range(len(prompts))}
    for k, (i, image) in enumerate(zip(jobs, images)):
        grouped[i].append(np.asarray(image))
        if blueprints is not None:
            plans[i].append(np.asarray(blueprints[k]))
    return [
        T2IItem(f"{i:04d}_{p.category}", p.text, p.category, p.requirement, grouped[i], [Path(f"{i:04d}_{p.category}_{j}.png") for j in range(len(grouped[i]))],
                plans[i] if blueprints is not None else None)
        for i, p in enumerate(prompts)
    ]


def plan_summary(items: Sequence[T2IItem]) -> dict:
    """The plan score of the items' semantic blueprints: each decoded to its scene and checked against the prompt
    (`semantic_blueprint.plan_score`; no diffusion, no verifier). Summarised as `evaluate_t2i`'s images are."""
    from ..models.semantic_blueprint import plan_score

    pairs = [(item.category, plan_score(plan, item.requirement)) for item in items for plan in item.blueprints or []]
    return summarize_t2i([c for c, _ in pairs], [r for _, r in pairs])


def generate_edit_items(pipe, pairs: Sequence, seed: int = 0, batch_size: int = 16, progress: bool = True, **edit_kwargs) -> list[EditItem]:
    """Carry out canonical edit pairs (shapeworld.edits.EditPair) with a Pipeline: one output per pair, scored
    later against the pair's ground-truth source and target scenes. Batch k is drawn with seed `seed + k`."""
    from ..shapeworld.render import render

    sources = [render(p.source) for p in pairs]
    out = pipe.generate_in_batches([p.instruction for p in pairs], batch_size, seed, progress, reference_images=sources, **edit_kwargs)
    return [
        EditItem(f"{i:04d}_{p.spec.category}", p.instruction, p.spec, source, np.asarray(image), p.source, p.target, blueprint.numpy())
        for i, (p, source, image, blueprint) in enumerate(zip(pairs, sources, out.images, out.blueprints))
    ]


def edit_plan_summary(items: Sequence[EditItem]) -> dict:
    """The plan score of edits' semantic blueprints: each decoded to its scene and checked against the pair's source
    scene and instruction (no diffusion, no verifier; the consistency PSNR compares the source's drawing, which
    `generate_edit_items` made, with the plan's). Says whether the AR model wrote the right edit, apart from how it
    was rendered."""
    from ..models.semantic_blueprint import decode_tokens
    from ..shapeworld.render import render

    plans = [decode_tokens(item.blueprint) for item in items]
    results = [scored_edit(item, plan, render(plan), item.source_scene) for item, plan in zip(items, plans)]
    return summarize_edits([item.spec.category for item in items], results)


def scored_edit(item: EditItem, output: Scene, output_image: np.ndarray, source: Scene) -> EditResult:
    """`check_edit` of one output against the item's source and instruction; an instruction the source cannot carry
    out (e.g. it names an object the source does not hold) scores as failed."""
    try:
        return check_edit(source, item.spec, output, item.source_image, output_image, item.target_scene)
    except EditError as e:
        return EditResult(passed=False, psnr=None, reasons=[str(e)])


def parse_images(images: Sequence[np.ndarray], parser: SceneParser) -> list[Scene]:
    """Parse images of possibly different sizes, batching those of equal size."""
    out: list[Scene | None] = [None] * len(images)
    by_size: dict[int, list[int]] = {}
    for i, img in enumerate(images):
        by_size.setdefault(img.shape[0], []).append(i)
    for idx in by_size.values():
        for i, scene in zip(idx, parser.parse_batch(np.stack([images[i] for i in idx]))):
            out[i] = scene
    return out  # type: ignore[return-value]


def load_edit_items(edits_path: str | Path, out_dir: str | Path) -> list[EditItem]:
    edits_path, out_dir = Path(edits_path), Path(out_dir)
    if not out_dir.is_dir():
        raise InputError(f"{out_dir}: no such folder")
    items = []
    for lineno, rec in enumerate(read_jsonl(edits_path, required=("id", "instruction", "source")), start=1):
        where = f"{edits_path}:{lineno}"
        try:
            spec = parse_instruction(str(rec["instruction"]))
            source_scene = Scene.from_dict(rec["source_scene"]) if rec.get("source_scene") else None
            target_scene = Scene.from_dict(rec["target_scene"]) if rec.get("target_scene") else None
        except (ValueError, TypeError) as e:
            raise InputError(f"{where}: {e}") from None
        source_path = edits_path.parent / str(rec["source"])
        output_path = out_dir / f"{rec['id']}.png"
        if not output_path.is_file():
            raise InputError(f"{where}: no output image {output_path}")
        source = _check_canvas(source_path, load_square_image(source_path))
        output = _check_canvas(output_path, load_square_image(output_path))
        if output.shape != source.shape:
            raise InputError(f"{output_path}: output is {output.shape[0]} px but its source is {source.shape[0]} px")
        items.append(EditItem(str(rec["id"]), str(rec["instruction"]), spec, source, output, source_scene, target_scene))
    return items


def evaluate_edits(items: Sequence[EditItem], parser: SceneParser | None = None) -> tuple[list[dict[str, Any]], dict]:
    """Score every edit output; a missing ground-truth source scene is parsed from the source image."""
    parser = parser or SceneParser()
    outputs = parse_images([it.output_image for it in items], parser)
    need_source = [i for i, it in enumerate(items) if it.source_scene is None]
    parsed_sources = dict(zip(need_source, parse_images([items[i].source_image for i in need_source], parser)))
    rows, results = [], []
    for i, (item, out_scene) in enumerate(zip(items, outputs)):
        r = scored_edit(item, out_scene, item.output_image, item.source_scene or parsed_sources[i])
        results.append(r)
        rows.append(
            {"id": item.id, "instruction": item.instruction, "category": item.spec.category, "passed": r.passed,
             "psnr": r.psnr, "partial": r.partial, "reasons": r.reasons, "parsed_output": out_scene.to_dict()}
        )
    return rows, summarize_edits([row["category"] for row in rows], results)


def t2i_grid(items: Sequence[T2IItem], rows: Sequence[dict[str, Any]], tile: int = 128):
    images = [img for item in items for img in item.images][:GRID_LIMIT]
    rows = rows[:GRID_LIMIT]
    return image_grid([[img] for img in images], [r["prompt"] for r in rows], [r["passed"] for r in rows], tile=tile, columns=8)


def edit_grid(items: Sequence[EditItem], rows: Sequence[dict[str, Any]], tile: int = 128):
    items, rows = items[:GRID_LIMIT], rows[:GRID_LIMIT]
    cells = [[it.source_image, it.output_image] for it in items]
    return image_grid(cells, [r["instruction"] for r in rows], [r["passed"] for r in rows], tile=tile, columns=4)


def format_t2i_table(summary: dict) -> str:
    lines = [f"{'category':<14}{'n':>6}{'pass':>8}{'partial':>9}{'ocr':>7}"]
    for cat, s in summary["categories"].items():
        ocr = f"{s['ocr']:.3f}" if "ocr" in s else "-"
        lines.append(f"{cat:<14}{s['n']:>6}{s['pass']:>8.3f}{s['partial']:>9.3f}{ocr:>7}")
    overall = summary["overall"]
    lines.append(f"{'overall':<14}{'':>6}{overall:>8.3f}   (mean of the six GenEval categories)" if overall is not None else "overall: n/a (no GenEval category)")
    return "\n".join(lines)


def format_edit_table(summary: dict) -> str:
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"{'category':<12}{'n':>6}{'success':>9}{'psnr':>8}{'>=30dB':>8}"]
    for cat, s in list(summary["categories"].items()) + [("overall", summary["overall"])]:
        lines.append(f"{cat:<12}{s['n']:>6}{fmt(s['success'], '.3f'):>9}{fmt(s['psnr'], '.1f'):>8}{fmt(s['consistent_successes'], '.3f'):>8}")
    return "\n".join(lines)
