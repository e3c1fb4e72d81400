"""The CLI: help on every command, render -> eval round trips, and bad input handled in one line."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip3o_next.cli import main


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("render") / "samples"
    assert main(["data", "render", "--per-category", "2", "--out", str(out)]) == 0
    return out


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", [[], ["data"], ["data", "render"], ["data", "export"], ["eval"], ["eval", "t2i"], ["eval", "edit"],
                                     ["eval", "imgedit"], ["edit"], ["train"]])
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as e:
        main(command + ["--help"])
    assert e.value.code == 0
    assert "usage: blip3o" in capsys.readouterr().out


def test_console_script_installed():
    exe = shutil.which("blip3o")
    assert exe, "the blip3o console script is not on PATH (pip install -e .)"
    assert subprocess.run([exe, "--help"], capture_output=True).returncode == 0


def test_render_writes_everything_and_scores_perfectly(rendered):
    assert {p.name for p in rendered.iterdir()} == {"prompts.jsonl", "images", "scores.json", "grid.png"}
    scores = json.loads((rendered / "scores.json").read_text())
    assert scores["summary"]["overall"] == 1.0 and len(scores["items"]) == 16


def test_eval_t2i_round_trip(rendered, tmp_path, capsys):
    code, out, _ = run(["eval", "t2i", rendered / "prompts.jsonl", rendered / "images", "--json", tmp_path / "r.json", "--grid", tmp_path / "g.png"], capsys)
    assert code == 0 and "overall" in out
    assert json.loads((tmp_path / "r.json").read_text())["summary"]["overall"] == 1.0
    assert Image.open(tmp_path / "g.png").size[0] > 0


def test_edit_render_and_eval(tmp_path, capsys):
    out = tmp_path / "edits"
    assert main(["data", "render", "--kind", "edit", "--per-category", "1", "--out", str(out)]) == 0
    code, text, _ = run(["eval", "edit", out / "edits.jsonl", out / "targets", "--json", "-", "--grid", tmp_path / "g.png"], capsys)
    payload = json.loads(text[text.index("{") : text.rindex("}") + 1])
    assert code == 0 and payload["summary"]["overall"]["success"] == 1.0
    # Without ground-truth scenes, sources are parsed by the verifier instead.
    records = [json.loads(l) for l in (out / "edits.jsonl").read_text().splitlines()]
    (out / "bare.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("id", "instruction", "source")}) + "\n" for r in records))
    code, text, _ = run(["eval", "edit", out / "bare.jsonl", out / "targets", "--grid", tmp_path / "g2.png"], capsys)
    assert code == 0 and "overall" in text


def test_data_export(tmp_path, capsys):
    code, out, _ = run(["data", "export", tmp_path / "shards", "--n", "5", "--shard-size", "3"], capsys)
    assert code == 0 and len(list((tmp_path / "shards").glob("*.tar"))) == 2
    code, _, err = run(["data", "export", tmp_path / "shards", "--n", "5"], capsys)
    assert code == 2 and err.count("\n") == 1


@pytest.fixture
def workdir(rendered, tmp_path):
    shutil.copytree(rendered, tmp_path / "w")
    return tmp_path / "w"


def expect_error(capsys, args, must_name, outputs):
    code, _, err = run(args, capsys)
    assert code == 2
    assert err.startswith("blip3o: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert must_name in err
    for p in outputs:
        assert not Path(p).exists(), f"partial output {p}"


def eval_args(w):
    return ["eval", "t2i", w / "prompts.jsonl", w / "images", "--json", w / "r.json", "--grid", w / "g.png"]


def first_image(w):
    return sorted((w / "images").glob("*.png"))[0]


def test_non_image_file(workdir, capsys):
    first_image(workdir).write_text("not an image")
    expect_error(capsys, eval_args(workdir), first_image(workdir).name, [workdir / "r.json", workdir / "g.png"])


def test_truncated_png(workdir, capsys):
    p = first_image(workdir)
    p.write_bytes(p.read_bytes()[:200])
    expect_error(capsys, eval_args(workdir), p.name, [workdir / "r.json", workdir / "g.png"])


def test_huge_image(workdir, capsys):
    Image.new("L", (10_000, 10_000), 255).save(first_image(workdir))
    expect_error(capsys, eval_args(workdir), first_image(workdir).name, [workdir / "r.json", workdir / "g.png"])


def test_malformed_jsonl_line(workdir, capsys):
    lines = (workdir / "prompts.jsonl").read_text().splitlines()
    lines[2] = '{"id": "broken", '
    (workdir / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    expect_error(capsys, eval_args(workdir), "prompts.jsonl:3", [workdir / "r.json", workdir / "g.png"])


def test_missing_field_and_bad_prompt(workdir, capsys):
    lines = (workdir / "prompts.jsonl").read_text().splitlines()
    lines[0] = json.dumps({"id": "0000_single_object"})
    (workdir / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    expect_error(capsys, eval_args(workdir), "prompts.jsonl:1: missing field 'prompt'", [])
    lines[0] = json.dumps({"id": "0000_single_object", "prompt": "a photo of a unicorn"})
    (workdir / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    expect_error(capsys, eval_args(workdir), "prompts.jsonl:1", [])


def test_unwritable_output(workdir, capsys):
    (workdir / "file").write_text("x")
    args = ["eval", "t2i", workdir / "prompts.jsonl", workdir / "images", "--grid", workdir / "file" / "g.png"]
    expect_error(capsys, args, "file", [])


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "I;16"])
def test_convertible_modes(workdir, capsys, mode):
    for p in sorted((workdir / "images").glob("*.png"))[:3]:  # single_object prompts: any color passes
        rgb = Image.open(p).convert("RGB")
        if mode == "RGBA":
            im = rgb.convert("RGBA")
        elif mode == "P":
            im = rgb.quantize(colors=64, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        elif mode == "L":
            im = rgb.convert("L")
        else:
            im = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        im.save(p)
        assert Image.open(p).mode == mode
    code, _, err = run(eval_args(workdir), capsys)
    assert code == 0, err
    items = json.loads((workdir / "r.json").read_text())["items"]
    if mode in ("RGBA", "P"):  # lossless conversions still pass
        assert all(r["passed"] for r in items[:3])


def test_argument_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "blip3o_next.cli", "data", "render", "--canvas", "9"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "canvas" in r.stderr
