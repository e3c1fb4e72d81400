"""The `blip3o` command line: the argument parser and `main`. Thin: each command is a function of `commands.py`
that calls the Python API and prints results.

User errors (bad files, bad arguments) print one line to stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Callable

from .commands import (
    cmd_convert, cmd_data_export, cmd_data_render, cmd_edit, cmd_eval_edit, cmd_eval_geneval, cmd_eval_imgedit, cmd_eval_t2i, cmd_generate,
    cmd_serve, cmd_train,
)
from .fileio import InputError
from .runtime import end_process_group, keep_freed_memory

MAX_STEPS = 1000  # diffusion steps; the sampler converges in tens, so more only burns time (the server caps at 100)


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
    parser.add_argument("--id-temperature", type=_non_negative,
                        help="semantic blueprints: draw each token's kind (empty, a shape, a letter) at --temperature, then which one "
                             "at this temperature; 0 = the most probable (default: the model's; 0.5 for tiny)")
    parser.add_argument("--best-of", type=_positive,
                        help="sample this many blueprints per image and render the one the AR model finds most likely; "
                             "ignored at temperature 0 (default: the model's)")
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
        "blip3o_next.training.grpo_config.GRPOConfig): configs/tiny/6_semantic_grpo.yaml tunes a semantic-blueprint model on plan rewards "
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
                    help="a stage's settings (fields of blip3o_next.training.config.TrainConfig, or GRPOConfig for grpo) or a recipe (a `stages:` list)")
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
    finally:
        end_process_group()


if __name__ == "__main__":
    sys.exit(main())
