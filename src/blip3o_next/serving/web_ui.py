"""The web page (gradio) at /: "Text to image" and "Edit" tabs over the same checks, queue and worker as the API."""

from __future__ import annotations

import html
from collections.abc import Callable
from typing import Any

import anyio
from fastapi import FastAPI

from .config import MAX_SEED, ServerConfig
from .inputs import EDIT_FIELDS, GENERATE_FIELDS, ApiError, Defaults, decode_image, parse_params
from .worker import NO_EDIT, GenerationWorker, Result, call_model, can_edit, run_edit, run_generate

PAGE_CSS = """
#t2i-gallery img, #t2i-blueprints img, #edit-gallery img, #edit-blueprints img, #edit-image img { image-rendering: pixelated; }
"""


def build_ui(pipe: Any, config: ServerConfig, worker: GenerationWorker) -> Any:
    """The gradio page: a text-to-image tab and an edit tab sharing the API's checks and worker."""
    import gradio as gr

    defaults = Defaults.of(pipe, config)

    def settings(prefix: str) -> tuple[Any, Any, Any, Any]:
        with gr.Row():
            seed = gr.Number(label="Seed (-1: random)", value=0, precision=0, minimum=-1, maximum=MAX_SEED,
                             elem_id=f"{prefix}-seed")
            num = gr.Slider(1, config.max_num_images, value=1, step=1, label="Number of images", elem_id=f"{prefix}-num-images")
        steps = gr.Slider(1, config.max_steps, value=defaults.steps, step=1, label="Diffusion steps", elem_id=f"{prefix}-steps")
        guidance = gr.Slider(0, config.max_guidance, value=defaults.guidance, step=0.1, label="Guidance scale",
                             elem_id=f"{prefix}-guidance")
        return seed, steps, guidance, num

    def outputs(prefix: str, what: str) -> tuple[Any, Any, Any]:
        with gr.Row():
            images = gr.Gallery(label=what, format="png", columns=2, object_fit="contain", buttons=["download", "fullscreen"],
                                elem_id=f"{prefix}-gallery", interactive=False)
            previews = gr.Gallery(label="Blueprint (the AR model's image tokens, decoded)", format="png", columns=2,
                                  object_fit="contain", buttons=["download", "fullscreen"], elem_id=f"{prefix}-blueprints",
                                  interactive=False)
        info = gr.Markdown(elem_id=f"{prefix}-info")
        return images, previews, info

    def controls(prefix: str, label: str, examples: tuple[str, ...], action: str) -> tuple[Any, tuple[Any, ...], Any]:
        """A tab's request side: the text box, the settings, the button and example texts that fill the box."""
        text = gr.Textbox(label=label, lines=2, max_length=config.max_prompt_chars, placeholder=examples[0] if examples else "",
                          elem_id=f"{prefix}-{label.lower()}")
        knobs = settings(prefix)
        button = gr.Button(action, variant="primary", elem_id=f"{prefix}-button")
        gr.Examples([[e] for e in examples], inputs=[text], label=f"Example {label.lower()}s", elem_id=f"{prefix}-examples")
        return text, knobs, button

    def wire(handler: Callable, button: Any, text: Any, inputs: list[Any], outs: tuple[Any, ...]) -> None:
        """The button and Enter in the text box both run `handler`; the worker, not gradio, limits concurrency."""
        for trigger in (button.click, text.submit):
            trigger(handler, inputs=inputs, outputs=list(outs), concurrency_limit=None)

    def fields(seed: Any, steps: Any, guidance: Any, num: Any) -> dict[str, Any]:
        return {"seed": None if seed is None or seed < 0 else seed, "steps": steps, "guidance": guidance, "num_images": num}

    def summary(result: Result) -> str:
        p = result.params
        return (f"seed {p.seed} · {p.steps} steps · guidance {p.guidance:g} · {len(result.images)} image(s) "
                f"in {result.seconds:.2f} s")

    async def generate(prompt: str, seed: Any, steps: Any, guidance: Any, num: Any,
                       progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's way
        """The Generate button: same checks and queue as POST /api/generate."""
        try:
            text, params = parse_params({"prompt": prompt, **fields(seed, steps, guidance, num)}, "prompt", GENERATE_FIELDS,
                                        config, defaults, form=True)
            progress(0, desc="waiting for the model")
            result = await call_model(worker, lambda: run_generate(pipe, text, params, progress=True))
        except ApiError as e:
            raise gr.Error(html.escape(e.message), title=ui_title(e.status), print_exception=False) from None
        return result.images, result.previews, summary(result)

    async def edit(image_path: str | None, instruction: str, seed: Any, steps: Any, guidance: Any, num: Any,
                   progress=gr.Progress(track_tqdm=True)):  # noqa: B008 - gradio's way
        """The Edit button: same checks and queue as POST /api/edit."""
        try:
            text, params = parse_params({"instruction": instruction, **fields(seed, steps, guidance, num)}, "instruction",
                                        EDIT_FIELDS - {"image"}, config, defaults, form=True)
            if not image_path:
                raise ApiError(422, "upload an image to edit first")
            raw = await anyio.to_thread.run_sync(read_upload, image_path, config.max_body_bytes)
            image = await anyio.to_thread.run_sync(decode_image, raw, config.max_image_side)
            if not can_edit(pipe):
                raise ApiError(501, NO_EDIT)
            progress(0, desc="waiting for the model")
            result = await call_model(worker, lambda: run_edit(pipe, image, text, params))
        except ApiError as e:
            raise gr.Error(html.escape(e.message), title=ui_title(e.status), print_exception=False) from None
        return result.images, result.previews, summary(result)

    # The page's result PNGs are files in gradio's cache: drop those older than an hour, hourly, so disk use stays flat.
    with gr.Blocks(title=f"BLIP3o-NEXT · {config.model_name}", analytics_enabled=False, delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"## BLIP3o-NEXT: text to image and editing\nModel: `{config.model_name}`. The AR model writes a "
                    "blueprint of image tokens (right), the diffusion model renders it (left). The same model serves "
                    "`POST /api/generate` and `POST /api/edit`.")
        with gr.Tabs():
            with gr.Tab("Text to image", id="t2i", elem_id="tab-t2i"):
                with gr.Row():
                    with gr.Column(scale=1):
                        prompt, t2i_settings, t2i_button = controls("t2i", "Prompt", config.examples, "Generate")
                    with gr.Column(scale=2):
                        t2i_out = outputs("t2i", "Images")
                wire(generate, t2i_button, prompt, [prompt, *t2i_settings], t2i_out)
            with gr.Tab("Edit", id="edit", elem_id="tab-edit"):
                if not can_edit(pipe):
                    gr.Markdown("**This model cannot edit** (it was not trained to: no edit SFT). Uploads are still "
                                "checked; the Edit button answers with this notice.", elem_id="edit-unavailable")
                with gr.Row():
                    with gr.Column(scale=1):
                        source = gr.Image(label="Image to edit", type="filepath", sources=["upload", "clipboard"], format="png",
                                          elem_id="edit-image")
                        instruction, edit_settings, edit_button = controls("edit", "Instruction", config.edit_examples, "Edit")
                    with gr.Column(scale=2):
                        edit_out = outputs("edit", "Edited images")
                wire(edit, edit_button, instruction, [source, instruction, *edit_settings], edit_out)
    demo.queue(max_size=max(1, config.queue_size), default_concurrency_limit=None)
    return demo


def ui_title(status: int) -> str:
    """The title of the page's error pop-up for an API status."""
    if status in (429, 503, 504):
        return "Busy"
    return "Not available" if status == 501 else "Error"


def read_upload(path: str, limit: int) -> bytes:
    """A file gradio stored for an upload, refusing more than `limit` bytes."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ApiError(400, f"cannot read the upload ({e.strerror or e})") from None
    if len(data) > limit:
        raise ApiError(413, f"the upload is over the {limit}-byte limit")
    return data


def page_theme() -> Any:
    """gradio's default look with system fonts, so the page loads nothing from outside this server."""
    import gradio as gr

    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])


def mount_page(app: FastAPI, demo: Any, config: ServerConfig) -> None:
    """Mount the gradio page at / with its file checks on.

    gradio refuses a request's file path outside its upload folder only once `Blocks.has_launched` is set, and only
    `Blocks.launch()` sets it; a page mounted on our app never launches, so without the line below any file the
    process can read could be copied into gradio's cache by a crafted call and then downloaded. Run history is off: it
    keeps past requests and can send them to an outside bucket."""
    import gradio as gr

    gr.mount_gradio_app(app, demo, path="/", max_file_size=config.max_body_bytes, ssr_mode=False, theme=page_theme(),
                        css=PAGE_CSS, footer_links=["gradio", "settings"], run_history=False, show_error=False)
    demo.has_launched = True
