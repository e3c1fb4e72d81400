"""`blip3o generate` and `blip3o eval geneval` with a tiny random model: outputs, reports and bad input."""

import json
import logging
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from blip3o_next.cli import main


@pytest.fixture(scope="module")
def model_dir(model_and_batch, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "small"
    model_and_batch[0].save_pretrained(path)
    return path


def run(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse rejects bad arguments this way
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_generate_writes_images_blueprints_and_grid(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a star\n\n")
    out = tmp_path / "imgs" / "out.png"
    code, stdout, _ = run(["generate", "a photo of a red circle", "--prompts-file", prompts, "-n", "2", "-o", out, "--grid", tmp_path / "grid.png",
                           "--show-blueprint", "--model", model_dir, "--steps", "2", "--batch-size", "3"], capsys)
    assert code == 0, stdout
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == [f"out_{i:03d}{s}.png" for i in range(4) for s in ("", "_blueprint")]
    assert Image.open(out.parent / "out_000.png").size == (64, 64) and Image.open(tmp_path / "grid.png").size[0] > 128
    assert "out_000.png" in stdout and "out_003.png" in stdout


def test_generate_is_reproducible(model_dir, tmp_path, capsys):
    for name in ("a.png", "b.png"):
        assert run(["generate", "a photo of two stars", "-o", tmp_path / name, "--model", model_dir, "--steps", "2", "--seed", "5"], capsys)[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()


@pytest.mark.parametrize("args, message", [
    (["generate", ""], "prompt 1 is empty"),
    (["generate"], "no prompt given"),
    (["generate", "a star", "--top-p", "0"], "must be in (0, 1]"),
    (["generate", "a star", "--steps", "-3"], "must be >= 1"),
    (["generate", "a star", "--steps", "1001"], "must be in [1, 1000]"),
    (["generate", "a star", "--guidance", "inf"], "--guidance: must be a finite number >= 0"),
    (["generate", "a star", "--guidance", "nan"], "--guidance: must be a finite number >= 0"),
    (["generate", "a star", "--temperature", "inf"], "--temperature: must be a finite number >= 0"),
])
def test_generate_rejects_bad_arguments(model_dir, tmp_path, capsys, args, message):
    code, _, err = run(args + ["--model", model_dir, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_generate_refuses_unwritable_output_and_bad_model(model_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, _, err = run(["generate", "a star", "-o", blocker / "out.png", "--model", model_dir], capsys)
    assert code == 2 and "cannot write there" in err
    code, _, err = run(["generate", "a star", "-o", tmp_path / "o.png", "--model", tmp_path / "nowhere"], capsys)
    assert code == 2 and "blip3o_config.json" in err and not (tmp_path / "o.png").exists()


@pytest.mark.parametrize("output", ["d.png", "d.png/"])
def test_a_folder_as_output_is_refused_before_the_model_loads(tmp_path, capsys, output):
    (tmp_path / "d.png").mkdir()
    code, _, err = run(["generate", "a star", "-o", f"{tmp_path}/{output}", "--model", tmp_path / "nowhere"], capsys)
    assert code == 2 and f"{tmp_path / 'd.png'}: is a folder" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(["generate", "a star", "-o", tmp_path / "o.png", "--grid", tmp_path / "d.png", "--model", tmp_path / "nowhere"], capsys)
    assert code == 2 and "is a folder" in err


def _damage(path: Path, how: str) -> Path:
    """Spoil one weights file of a model folder as a bad download or an old export would."""
    if how == "random bytes":
        path.write_bytes(random.Random(0).randbytes(5000))
    elif how == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:  # a pickle (torch.save) in place of the safetensors file
        torch.save(load_file(path), path.with_suffix(".bin"))
        path.unlink()
        return path.with_suffix(".bin")
    return path


@pytest.mark.parametrize("part, how", [("ar/model.safetensors", "random bytes"), ("ar/model.safetensors", "truncated"),
                                       ("transformer/diffusion_pytorch_model.safetensors", "pickle")])
def test_damaged_or_pickled_weights_give_one_line_naming_the_file(model_dir, tmp_path, capsys, part, how):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    culprit = _damage(model / part, how)
    code, _, err = run(["generate", "a star", "-o", tmp_path / "o.png", "--model", model, "--steps", "1"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and str(culprit) in err, err
    assert ("pickle weights are refused" in err) == (how == "pickle")
    assert not (tmp_path / "o.png").exists()


def test_generate_survives_odd_prompts(model_dir, tmp_path, capsys, caplog):
    with caplog.at_level(logging.WARNING):
        code, _, _ = run(["generate", "zorblax " * 1250, "un cercle rouge ☃ 日本語 ✓", "-o", tmp_path / "o.png", "--model", model_dir, "--steps", "1"], capsys)
    assert code == 0 and "truncated" in caplog.text
    assert (tmp_path / "o_000.png").is_file() and (tmp_path / "o_001.png").is_file()


def test_eval_geneval_scores_every_category(model_dir, tmp_path, capsys):
    report = tmp_path / "geneval.json"
    code, stdout, _ = run(["eval", "geneval", "--model", model_dir, "--per-category", "2", "--steps", "1", "--json", report,
                           "--grid", tmp_path / "grid.png"], capsys)
    assert code == 0 and "overall" in stdout
    summary = json.loads(report.read_text())["summary"]
    assert set(summary["categories"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr", "text", "dense"}
    assert all(s["n"] >= 2 for s in summary["categories"].values()) and summary["settings"]["per_category"] == 2
    assert (tmp_path / "grid.png").is_file()


def test_eval_geneval_can_score_the_blueprint_decoding(model_dir, tmp_path, capsys):
    report = tmp_path / "bp.json"
    code, _, _ = run(["eval", "geneval", "--model", model_dir, "--per-category", "1", "--decode", "blueprint", "--json", report,
                      "--grid", tmp_path / "g.png"], capsys)
    assert code == 0 and json.loads(report.read_text())["summary"]["settings"]["decode"] == "blueprint"
