"""Recipes: stage configs run in order, each a training run (`trainer.train`) or a GRPO run (`grpo.train_grpo`) as
its `stage:` says; then the last model exported in a smaller dtype (the bundled weights) and each stage's curves,
last sample grid and timings copied to the recipe's `docs_dir`. `blip3o train --config` reads a recipe or one stage.
The library writes only into run folders; copying results into docs/ is this module's job alone (a recipe's
`docs_dir`, or a GRPO stage file's `docs_dir`: its evaluations, table, grid and curves).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import InputError, write_json
from ..models.modeling import export_model
from .config import TrainConfig, config_from_mapping, read_extended_yaml, read_yaml
from .grpo import RESULT_FILES, train_grpo
from .grpo_config import GRPOConfig
from .trainer import train


@dataclass
class Recipe:
    """Stage configs run in order (each resumes where it stopped), then the last model exported.

    Stage paths are relative to the recipe file. `export_to` receives the final model in `export_dtype`
    (the bundled weights); `docs_dir` receives each stage's loss curves and last sample grid, and the timings.
    """

    stages: list[str]
    export_from: str | None = None
    export_to: str | None = None
    export_dtype: str = "float16"
    docs_dir: str | None = None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> "Recipe":
        data = read_yaml(path)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(data) - known:
            raise InputError(f"{path}: unknown recipe setting(s) {', '.join(sorted(set(data) - known))}")
        try:
            recipe = cls(**data)
        except TypeError as e:
            raise InputError(f"{path}: {e}") from None
        recipe.stages = [str(Path(path).parent / stage) for stage in recipe.stages]
        return recipe


def is_recipe(path: str | os.PathLike) -> bool:
    return "stages" in read_yaml(path)


def run_recipe(recipe: Recipe) -> dict[str, float]:
    """Train every stage, export the result, copy curves and grids to the docs; returns seconds per stage."""
    timings: dict[str, float] = {}
    outputs = []
    for stage_file in recipe.stages:
        start = time.perf_counter()
        outputs.append(train_stage_file(stage_file))
        timings[Path(stage_file).stem] = round(time.perf_counter() - start, 1)
    if recipe.export_to:
        export_model(recipe.export_from or str(outputs[-1] / "final"), recipe.export_to, recipe.export_dtype)
    if recipe.docs_dir:
        copy_training_docs(outputs, [Path(f).stem for f in recipe.stages], Path(recipe.docs_dir), timings)
    return timings


def read_stage_file(path: str | os.PathLike, stage: str | None = None, **overrides: Any) -> tuple[TrainConfig | GRPOConfig, str | None]:
    """The config a stage file describes (GRPOConfig for `stage: grpo`, or when `stage` says so; else TrainConfig) and
    the folder its results are copied to: a GRPO file's `docs_dir`, if set."""
    data = read_extended_yaml(path)
    if (stage or data.get("stage")) != "grpo":
        return config_from_mapping(TrainConfig, data, path, **overrides), None
    docs_dir = data.pop("docs_dir", None)
    return config_from_mapping(GRPOConfig, data, path, **overrides), docs_dir


def train_stage_file(path: str | os.PathLike, stage: str | None = None, **overrides: Any) -> Path:
    """Run the stage a config file describes (`read_stage_file`); returns its output folder. A GRPO file's `docs_dir`
    receives the run's results (`grpo.RESULT_FILES`)."""
    cfg, docs_dir = read_stage_file(path, stage, **overrides)
    if not isinstance(cfg, GRPOConfig):
        return train(cfg)
    out = train_grpo(cfg)
    if docs_dir:
        copy_results(out, Path(docs_dir), RESULT_FILES)
    return out


def copy_results(out: Path, docs: Path, names: tuple[str, ...]) -> None:
    """Copy those of `names` that the run folder `out` holds into `docs`."""
    docs.mkdir(parents=True, exist_ok=True)
    for name in names:
        if (out / name).is_file():
            shutil.copyfile(out / name, docs / name)


def copy_training_docs(outputs: list[Path], names: list[str], docs: Path, timings: dict[str, float]) -> None:
    docs.mkdir(parents=True, exist_ok=True)
    for out, name in zip(outputs, names):
        for curves in ("loss_curves.png", "reward_curves.png"):
            if (out / curves).is_file():
                shutil.copyfile(out / curves, docs / f"{name}_{curves}")
        grids = sorted(out.glob("samples-*.png"))
        if grids:
            shutil.copyfile(grids[-1], docs / f"{name}_samples.png")
    total = round(sum(timings.values()), 1)
    write_json(docs / "timings.json", {"seconds": timings, "total_seconds": total, "total_minutes": round(total / 60, 1)})
