"""The web page of `blip3o serve` in a real browser: headless Chromium (Debian's package, installed by
.ci/install-browser) driven by Playwright, against a real server on a loopback port with a tiny random model.
Outside CI they skip when Chromium is missing; in CI (CI set) they run and fail, so a broken install cannot hide."""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from pathlib import Path

import pytest
import torch
from PIL import Image

CHROMIUM = Path(os.environ.get("BLIP3O_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 90_000  # generous: a busy 2-core CI machine

GRADIO_WARNINGS = [  # gradio 6.31's queue uses pandas options that pandas 3 deprecates; not ours to fix
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
]
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists() and not os.environ.get("CI"),
                       reason=f"no Chromium at {CHROMIUM}; run .ci/install-browser (Debian's chromium)"),
    *GRADIO_WARNINGS,
]
pytest.importorskip("gradio", reason="the server needs gradio (pip install -e '.[test]')")
sync_api = pytest.importorskip("playwright.sync_api", reason="the browser tests need playwright (pip install -e '.[test]')")

import uvicorn

from blip3o_next.models.modeling import enable_editing
from blip3o_next.pipeline import Pipeline
from blip3o_next.serving.config import ServerConfig
from blip3o_next.serving.server import create_app
from blip3o_next.shapeworld.dataset import t2i_samples


@contextmanager
def running_server(pipe) -> Iterator[str]:
    """A real server (uvicorn, the same app as `blip3o serve`) on a free loopback port, in a background thread."""
    app = create_app(pipe, ServerConfig(default_steps=1, model_name="small", timeout_s=120))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


@pytest.fixture(scope="module")
def small_pipe(model_and_batch, tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny model is fastest on one thread, and CI's 2 cores stay free for the browser
    path = tmp_path_factory.mktemp("browser-model") / "small"
    model_and_batch[0].save_pretrained(path)
    yield Pipeline.from_pretrained(path)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server_url(small_pipe):
    with running_server(small_pipe) as url:
        yield url


@pytest.fixture(scope="module")
def editing_server_url(small_pipe):
    """The small model with the (untrained) editing paths switched on: a real edit call behind the Edit tab."""
    with running_server(Pipeline(enable_editing(copy.deepcopy(small_pipe.model)))) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api.expect.set_options(timeout=TIMEOUT_MS)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser):
    """Opens the page of a server in a fresh browser context (closed after the test)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)

    def open_page(url: str):
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(url + "/")
        return page

    yield open_page
    context.close()


@pytest.fixture
def source_png(tmp_path) -> Path:
    """A ShapeWorld image to upload for editing."""
    path = tmp_path / "source.png"
    Image.fromarray(next(islice(t2i_samples(0, 64), 1))["image"]).save(path)
    return path


def open_edit_tab(page) -> None:
    page.get_by_role("tab", name="Edit").click()
    sync_api.expect(page.locator("#edit-button")).to_be_visible()


def upload(page, path: Path) -> None:
    page.locator("#edit-image input[type=file]").set_input_files(str(path))
    sync_api.expect(page.locator("#edit-image img").first).to_be_visible()


def test_type_a_prompt_press_generate_and_an_image_appears(open_page, server_url, tmp_path):
    expect, page = sync_api.expect, open_page(server_url)
    page.locator("#t2i-examples").get_by_text("a photo of three green triangles").click()  # an example fills the prompt
    expect(page.locator("#t2i-prompt textarea")).to_have_value("a photo of three green triangles")
    page.locator("#t2i-prompt textarea").fill("a photo of a red circle left of a blue star")
    page.locator("#t2i-button").click()
    expect(page.locator("#t2i-gallery img").first).to_be_visible()
    expect(page.locator("#t2i-blueprints img").first).to_be_visible()  # the blueprint's preview beside the image
    expect(page.locator("#t2i-info")).to_contain_text("seed 0")
    page.locator("#t2i-gallery img").first.click()  # the preview, with its download button
    with page.expect_download() as download:
        page.locator("#t2i-gallery").get_by_role("button", name="Download").click()
    saved = tmp_path / "download.png"
    download.value.save_as(saved)
    assert download.value.suggested_filename.endswith(".png")
    assert Image.open(saved).format == "PNG" and Image.open(saved).size == (64, 64)


def test_bad_input_shows_a_clear_message_and_the_page_keeps_working(open_page, server_url):
    page = open_page(server_url)
    page.locator("#t2i-prompt textarea").fill("   ")
    page.locator("#t2i-button").click()
    sync_api.expect(page.get_by_text("prompt is empty").first).to_be_visible()
    page.locator("#t2i-prompt textarea").fill("a photo of a star")
    page.locator("#t2i-button").click()
    sync_api.expect(page.locator("#t2i-gallery img").first).to_be_visible()


def test_edit_tab_says_a_text_to_image_model_cannot_edit(open_page, server_url, source_png):
    page = open_page(server_url)
    open_edit_tab(page)
    sync_api.expect(page.locator("#edit-unavailable")).to_contain_text("cannot edit")
    upload(page, source_png)
    page.locator("#edit-instruction textarea").fill("make the green cross bigger")
    page.locator("#edit-button").click()
    sync_api.expect(page.get_by_text("it was not trained to").first).to_be_visible()


def test_upload_an_image_run_an_edit_and_an_image_appears(open_page, editing_server_url, source_png):
    page = open_page(editing_server_url)
    open_edit_tab(page)
    sync_api.expect(page.locator("#edit-unavailable")).to_have_count(0)
    page.locator("#edit-examples").get_by_text("change the background to white").click()
    upload(page, source_png)
    page.locator("#edit-button").click()
    sync_api.expect(page.locator("#edit-gallery img").first).to_be_visible()
    sync_api.expect(page.locator("#edit-blueprints img").first).to_be_visible()
    sync_api.expect(page.locator("#edit-info")).to_contain_text("seed 0")
