"""The HTTP API of `blip3o serve`: real generation with a tiny random model, and every error path (bad JSON, bad
fields, bad and huge images, oversized bodies, overload, timeouts, model failures) with an instant stand-in model."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("gradio", reason="the server needs gradio (pip install -e '.[test]')")
from fastapi.testclient import TestClient

from blip3o_next.cli import main
from blip3o_next.pipeline import Pipeline, PipelineOutput
from blip3o_next.serving.config import ServerConfig
from blip3o_next.serving.inputs import decode_image
from blip3o_next.serving.server import create_app, is_loopback, served_host_names


def png(size=(64, 64), color=(200, 30, 30), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


def b64png(text: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(text)))


class FakePipe:
    """An instant stand-in for the model. `gate` holds every call until set (to fill the queue); `fail` is raised."""

    def __init__(self, gate: threading.Event | None = None, fail: Exception | None = None):
        self.gate, self.fail, self.calls = gate, fail, []

    def _output(self, n: int, seed: int) -> PipelineOutput:
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail is not None:
            raise self.fail
        image = Image.new("RGB", (64, 64), (seed % 256, 0, 0))
        return PipelineOutput(images=[image] * n, blueprints=torch.zeros(n, 4, dtype=torch.long), blueprint_previews=[image] * n)

    def __call__(self, prompts, seed=None, num_inference_steps=None, guidance_scale=None, progress=False, **sampling):
        self.calls.append({"prompts": prompts, "seed": seed, "steps": num_inference_steps, "guidance": guidance_scale, **sampling})
        return self._output(len(prompts), seed)


class EditingPipe(FakePipe):
    """A stand-in that can edit, as the pipeline will once editing lands."""

    def edit(self, image, instruction, seed=None, num_inference_steps=None, guidance_scale=None, **sampling):
        self.calls.append({"image": image, "instruction": instruction, "seed": seed, "steps": num_inference_steps, **sampling})
        return self._output(1, seed)


LOCAL = "http://127.0.0.1:7860"  # the server's own origin: requests from elsewhere are refused


def client_for(pipe, **config) -> TestClient:
    return TestClient(create_app(pipe, ServerConfig(ui=False, **{"default_steps": 1, **config})), base_url=LOCAL)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: the tiny model is fastest so, and it keeps the tests quick on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def real_client(model_and_batch, tmp_path_factory, one_thread):
    path = tmp_path_factory.mktemp("server-model") / "small"
    model_and_batch[0].save_pretrained(path)
    with client_for(Pipeline.from_pretrained(path), model_name="small") as client:
        yield client


@pytest.fixture
def fake():
    pipe = FakePipe()
    with client_for(pipe) as client:
        client.pipe = pipe
        yield client


# ----------------------------------------------------------------------------- the real model


def test_generate_returns_images_and_blueprints(real_client):
    r = real_client.post("/api/generate", json={"prompt": "a photo of a red circle", "seed": 3, "steps": 2, "num_images": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["seed"] == 3 and body["steps"] == 2 and body["num_images"] == 2
    assert [b64png(s).size for s in body["images"]] == [(64, 64)] * 2
    assert [b64png(s).format for s in body["blueprints"]] == ["PNG"] * 2
    again = real_client.post("/api/generate", json={"prompt": "a photo of a red circle", "seed": 3, "steps": 2, "num_images": 2})
    assert again.json()["images"] == body["images"]  # same seed, same images


def test_generate_png_bytes_and_health(real_client):
    r = real_client.post("/api/generate", json={"prompt": "a star", "seed": 1}, headers={"Accept": "image/png"})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-seed"] == "1"
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)
    health = real_client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == "small" and health["edit"] is False  # a text-to-image model
    assert health["queue"]["running"] == 0 and health["queue"]["completed"] >= 1 and health["defaults"]["steps"] == 1


def test_generate_picks_a_seed_and_truncates_overlong_token_lists(real_client):
    r = real_client.post("/api/generate", json={"prompt": "zorblax " * 120, "temperature": 0, "top_k": 5, "top_p": 0.5})
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["seed"], int) and r.json()["temperature"] == 0


# ----------------------------------------------------------------------------- bad requests


@pytest.mark.parametrize("body, status, message", [
    (b'{"prompt": "a star"', 400, "malformed JSON"),
    (b"", 400, "empty request body"),
    (b'["a star"]', 400, "must be a JSON object"),
    (b'{"prompt": "\xff\xfe"}', 400, "not UTF-8"),
    (b"[" * 100_000, 400, "malformed JSON"),
    (b"{}", 422, "missing field 'prompt'"),
    (b'{"prompt": ""}', 422, "prompt is empty"),
    (b'{"prompt": "   "}', 422, "prompt is empty"),
    (b'{"prompt": 7}', 422, "prompt must be a string"),
    (json.dumps({"prompt": "x" * 1001}).encode(), 422, "the limit is 1000"),
    (b'{"prompt": "a", "steps": 0}', 422, "steps must be in [1, 100]"),
    (b'{"prompt": "a", "steps": 101}', 422, "steps must be in [1, 100]"),
    (b'{"prompt": "a", "steps": "3"}', 422, "steps must be an integer"),
    (b'{"prompt": "a", "steps": 2.5}', 422, "steps must be an integer"),
    (b'{"prompt": "a", "steps": true}', 422, "steps must be an integer"),
    (b'{"prompt": "a", "guidance": -1}', 422, "guidance must be in [0, 20]"),
    (b'{"prompt": "a", "guidance": NaN}', 422, "guidance must be in [0, 20]"),
    (b'{"prompt": "a", "guidance": 1e999}', 422, "guidance must be in [0, 20]"),
    (b'{"prompt": "a", "num_images": 0}', 422, "num_images must be in [1, 8]"),
    (b'{"prompt": "a", "num_images": 9}', 422, "num_images must be in [1, 8]"),
    (b'{"prompt": "a", "seed": -1}', 422, "seed must be in"),
    (b'{"prompt": "a", "seed": 1e30}', 422, "seed must be in"),
    (b'{"prompt": "a", "top_p": 0}', 422, "top_p must be in (0, 1]"),
    (b'{"prompt": "a", "top_k": 0}', 422, "top_k must be in"),
    (b'{"prompt": "a", "temperature": -0.5}', 422, "temperature must be in"),
    (b'{"prompt": "a", "num_inference_steps": 2}', 422, "unknown field 'num_inference_steps'"),
    (b'{"prompt": "a", "seed": ' + b"7" * 5000 + b"}", 400, "a number has too many digits"),
    (b'{"prompt": "a", "steps": -' + b"9" * 5000 + b"}", 400, "a number has too many digits"),
])
def test_generate_rejects_bad_bodies(fake, body, status, message):
    r = fake.post("/api/generate", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"] and "\n" not in r.json()["error"]
    assert not fake.pipe.calls
    assert fake.get("/health").json()["status"] == "ok"  # the server keeps serving


def test_generate_rejects_oversized_bodies_and_wrong_media(fake):
    r = fake.post("/api/generate", content=json.dumps({"prompt": "a" * 100}).encode() + b" " * (16 << 20),
                  headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit applies while streaming
        for _ in range(40):
            yield b" " * (1 << 16)

    with client_for(FakePipe(), max_body_bytes=1 << 20) as small:
        r = small.post("/api/generate", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "limit" in r.json()["error"]
    r = fake.post("/api/generate", files={"image": ("a.png", png())}, data={"prompt": "a star"})
    assert r.status_code == 415 and "takes Content-Type application/json" in r.json()["error"]


def test_generate_passes_settings_to_the_model(fake):
    r = fake.post("/api/generate", json={"prompt": "a star", "seed": 9, "steps": 4, "guidance": 3, "num_images": 3, "top_k": 7})
    assert r.status_code == 200 and len(r.json()["images"]) == 3
    assert fake.pipe.calls == [{"prompts": ["a star"] * 3, "seed": 9, "steps": 4, "guidance": 3.0, "top_k": 7}]
    fake.post("/api/generate", json={"prompt": "a star"})
    assert fake.pipe.calls[-1]["steps"] == 1 and fake.pipe.calls[-1]["guidance"] == 2.0  # the server's and model's defaults


def test_unknown_routes_and_methods_answer_json(fake):
    r = fake.get("/api/generate")
    assert r.status_code == 405 and "POST" in r.json()["error"]
    r = fake.post("/api/nothing", json={})
    assert r.status_code == 404 and "/api/generate" in r.json()["error"]


# ----------------------------------------------------------------------------- edit


def test_edit_answers_501_when_the_model_cannot_edit(fake, real_client):
    r = fake.post("/api/edit", files={"image": ("a.png", png(), "image/png")}, data={"instruction": "make it blue", "steps": "2"})
    assert r.status_code == 501 and "cannot edit" in r.json()["error"]
    r = real_client.post("/api/edit", files={"image": ("a.png", png(), "image/png")}, data={"instruction": "make it blue"})
    assert r.status_code == 501 and "not trained to" in r.json()["error"]
    r = fake.post("/api/edit", json={"image": "data:image/png;base64," + base64.b64encode(png()).decode(), "instruction": "x"})
    assert r.status_code == 501


def truncated_png() -> bytes:
    return png((64, 64), (1, 2, 3))[:60]


IMAGE = ("a.png", png(), "image/png")


@pytest.mark.parametrize("image, fields, status, message", [
    (("a.txt", b"hello, not an image", "text/plain"), {"instruction": "x"}, 415, "not a readable image"),
    (("a.png", truncated_png(), "image/png"), {"instruction": "x"}, 415, "not a readable image"),
    (("a.png", b"", "image/png"), {"instruction": "x"}, 415, "empty"),
    (("a.png", png((5000, 8)), "image/png"), {"instruction": "x"}, 413, "5000x8 px; the limit is 4096"),
    (None, {"instruction": "x"}, 422, "missing field 'image'"),
    (None, {"instruction": "x", "image": "not a file"}, 422, "must be a file upload"),
    (IMAGE, {}, 422, "missing field 'instruction'"),
    (IMAGE, {"instruction": " "}, 422, "instruction is empty"),
    (IMAGE, {"instruction": "x" * 1001}, 422, "the limit is 1000"),
    (IMAGE, {"instruction": "x", "steps": "many"}, 422, "steps must be an integer"),
    (IMAGE, {"instruction": "x", "guidance": "99"}, 422, "guidance must be in"),
    (IMAGE, {"instruction": "x", "colour": "red"}, 422, "unknown field 'colour'"),
])
def test_edit_rejects_bad_uploads(fake, image, fields, status, message):
    files = {k: (None, v) for k, v in fields.items()} | ({"image": image} if image else {})
    r = fake.post("/api/edit", files=files)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]
    assert fake.get("/health").json()["status"] == "ok"


@pytest.mark.parametrize("body, status, message", [
    ({"image": "%%% not base64", "instruction": "x"}, 400, "not valid base64"),
    ({"image": 5, "instruction": "x"}, 422, "must be a base64 string"),
    ({"image": base64.b64encode(b"GIF89a garbage").decode(), "instruction": "x"}, 415, "not a readable image"),
    ({"instruction": "x"}, 422, "missing field 'image'"),
    ({"image": base64.b64encode(png()).decode(), "instruction": "x", "num_images": 20}, 422, "num_images must be in"),
    (b'{"image": "", "instruction": "x", "seed": ' + b"7" * 5000 + b"}", 400, "a number has too many digits"),
])
def test_edit_rejects_bad_json(fake, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # bytes: json.dumps refuses 5,000 digits
    r = fake.post("/api/edit", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert message in r.json()["error"]


def test_edit_rejects_malformed_multipart(fake):
    r = fake.post("/api/edit", content=b"--xyz\r\nContent-Disposition: form-data\r\n\r\nbroken",
                  headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code in (400, 422), r.text
    assert fake.get("/health").json()["status"] == "ok"


def test_edit_calls_the_pipeline_when_it_can_edit():
    pipe = EditingPipe()
    with client_for(pipe) as client:
        r = client.post("/api/edit", files={"image": ("a.png", png(mode="RGBA", color=(0, 0, 255, 0)), "image/png")},
                        data={"instruction": "make it red", "seed": "5", "num_images": "2", "steps": "3"})
        assert r.status_code == 200, r.text
        assert len(r.json()["images"]) == 2 and r.json()["seed"] == 5
        assert [(c["seed"], c["steps"], c["instruction"]) for c in pipe.calls] == [(5, 3, "make it red"), (6, 3, "make it red")]
        assert pipe.calls[0]["image"].mode == "RGB" and pipe.calls[0]["image"].getpixel((0, 0)) == (255, 255, 255)
        r = client.post("/api/edit", json={"image": base64.b64encode(png()).decode(), "instruction": "x", "top_k": 3})
        assert r.status_code == 200 and pipe.calls[-1]["top_k"] == 3
        r = client.post("/api/edit", json={"image": base64.b64encode(png()).decode(), "instruction": "x"}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.content.startswith(b"\x89PNG")


def test_decode_image_converts_modes_and_refuses_bombs():
    assert decode_image(png(mode="L", color=128), 64).getpixel((0, 0)) == (128, 128, 128)
    with pytest.raises(Exception, match="the limit is 32 px"):
        decode_image(png((33, 10)), 32)


# ----------------------------------------------------------------------------- load limits and failures


def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def test_overload_answers_429_and_recovers():
    gate = threading.Event()
    pipe = FakePipe(gate=gate)
    with client_for(pipe, queue_size=1) as client:
        results = []

        def post():
            results.append(client.post("/api/generate", json={"prompt": "a star"}).status_code)

        threads = [threading.Thread(target=post) for _ in range(2)]
        for t in threads:
            t.start()
        wait_for(lambda: client.get("/health").json()["queue"]["waiting"] == 1)
        r = client.post("/api/generate", json={"prompt": "a star"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1 and "busy" in r.json()["error"]
        health = client.get("/health").json()  # answered at once while the model is busy
        assert health["queue"]["running"] == 1 and health["queue"]["rejected"] == 1
        gate.set()
        for t in threads:
            t.join(10)
        assert results == [200, 200]
        assert client.post("/api/generate", json={"prompt": "a star"}).status_code == 200


def test_timeouts_answer_504_and_drop_waiting_jobs():
    gate = threading.Event()
    pipe = FakePipe(gate=gate)
    with client_for(pipe, timeout_s=0.3, queue_size=2) as client:
        results = []
        threads = [threading.Thread(target=lambda: results.append(client.post("/api/generate", json={"prompt": "a"})))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert [r.status_code for r in results] == [504, 504] and "timeout" in results[0].json()["error"]
        assert len(pipe.calls) == 1  # the job that was still waiting never ran
        gate.set()
        wait_for(lambda: client.get("/health").json()["queue"]["running"] == 0)
        assert client.post("/api/generate", json={"prompt": "a"}).status_code == 200
        assert client.get("/health").json()["queue"]["timed_out"] == 2


@pytest.mark.parametrize("error, status, message", [
    (RuntimeError("boom"), 500, "generation failed (RuntimeError: boom)"),
    (ValueError("prompt 0 is empty"), 422, "prompt 0 is empty"),
    (MemoryError(), 500, "MemoryError"),
])
def test_model_failures_are_answered_and_the_server_keeps_serving(error, status, message):
    pipe = FakePipe(fail=error)
    with client_for(pipe) as client:
        r = client.post("/api/generate", json={"prompt": "a star"})
        assert r.status_code == status and message in r.json()["error"]
        pipe.fail = None
        assert client.post("/api/generate", json={"prompt": "a star"}).status_code == 200


# ----------------------------------------------------------------------------- page, config, CLI


@pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated")
def test_web_page_is_served_beside_the_api():
    with TestClient(create_app(FakePipe(), ServerConfig(default_steps=1)), base_url=LOCAL) as client:
        page = client.get("/")
        assert page.status_code == 200 and "<html" in page.text.lower()
        config = client.get("/config").json()
        ids = {c.get("props", {}).get("elem_id") for c in config["components"]}
        assert {"t2i-prompt", "t2i-button", "t2i-gallery", "t2i-blueprints", "edit-image", "edit-button", "edit-unavailable"} <= ids
        assert client.post("/api/generate", json={"prompt": "a star"}).status_code == 200
        assert client.get("/health").json()["status"] == "ok"


def test_server_config_and_loopback_checks():
    with pytest.raises(ValueError):
        ServerConfig(queue_size=-1)
    with pytest.raises(ValueError):
        ServerConfig(max_steps=0)
    with pytest.raises(ValueError, match="max_connections"):
        ServerConfig(max_connections=0)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.2.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("example.com")


def test_serve_command_help_and_bad_arguments(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--queue-size" in out and "127.0.0.1" in out
    with pytest.raises(SystemExit) as e:
        main(["serve", "--port", "70000"])
    assert e.value.code == 2 and "port" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path / "nowhere")]) == 2
    assert "blip3o_config.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- security


def test_a_foreign_host_name_is_refused_everywhere():
    """DNS rebinding: a site whose name resolves to 127.0.0.1 reaches the server with its own name in Host."""
    pipe = FakePipe()
    with TestClient(create_app(pipe, ServerConfig(default_steps=1)), base_url="http://evil.example:7860") as client:
        for method, path in (("post", "/api/generate"), ("get", "/health"), ("get", "/"), ("get", "/config")):
            r = client.request(method, path, json={"prompt": "a star"})
            assert r.status_code == 403 and "host 'evil.example' is not served here" in r.json()["error"], (path, r.text)
    assert not pipe.calls
    with client_for(FakePipe(), allowed_hosts=("demo.lan",)) as client:  # configurable
        assert client.get("/health", headers={"Host": "demo.lan:7860"}).status_code == 200
        assert client.get("/health", headers={"Host": "127.0.0.1:7860"}).status_code == 403
    assert served_host_names("0.0.0.0", ["Demo.LAN"]) == ("localhost", "127.0.0.1", "::1", "demo.lan")
    assert served_host_names("192.168.1.5") == ("localhost", "127.0.0.1", "::1", "192.168.1.5")


def test_cross_origin_browser_requests_are_refused(fake):
    """A page on another site may POST a "simple" request (text/plain, a form) from the user's browser without asking."""
    body = json.dumps({"prompt": "a star"})
    r = fake.post("/api/generate", content=body, headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert r.status_code == 403 and "cross-origin request from 'http://evil.example' refused" in r.json()["error"]
    r = fake.post("/api/edit", files={"image": IMAGE}, data={"instruction": "x"}, headers={"Origin": "null"})
    assert r.status_code == 403
    r = fake.post("/api/generate", content=body, headers={"Content-Type": "text/plain"})  # not even without an Origin
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    assert not fake.pipe.calls
    r = fake.post("/api/generate", content=body, headers={"Origin": LOCAL, "Content-Type": "application/json"})
    assert r.status_code == 200  # the server's own page
    with client_for(FakePipe(), allowed_origins=("https://app.example",)) as client:
        assert client.post("/api/generate", json={"prompt": "a"}, headers={"Origin": "https://app.example"}).status_code == 200


SECRET = "top-secret-8c1e77f0"


def _cached_copies(text: str) -> list[Path]:
    """Files in gradio's upload/cache folder holding `text`: anything there can be downloaded by its path."""
    from gradio.utils import get_upload_folder

    root = Path(get_upload_folder())
    return [f for f in root.rglob("*") if f.is_file() and text.encode() in f.read_bytes()] if root.is_dir() else []


def _sse_text(client: TestClient, url: str) -> str:
    with client.stream("GET", url) as r:
        return "".join(r.iter_text())


@pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated", "ignore:The copy keyword is deprecated")
def test_the_page_never_serves_a_file_it_was_not_given(tmp_path):
    """A crafted gradio call naming a local file must neither copy it into gradio's cache nor return it, through every
    route that takes a file, with the page mounted as `blip3o serve` mounts it."""
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    pipe = EditingPipe()
    file_data = {"path": str(secret), "meta": {"_type": "gradio.FileData"}}
    data = [file_data, "make it red", 0, 1, 2, 1]
    answers = []
    with TestClient(create_app(pipe, ServerConfig(default_steps=1)), base_url=LOCAL) as client:
        event = client.post("/gradio_api/call/edit", json={"data": data}).json()["event_id"]  # call
        answers.append(_sse_text(client, f"/gradio_api/call/edit/{event}"))
        answers.append(client.post("/gradio_api/run/edit", json={"data": data}).text)  # run
        fn_index = next(d["id"] for d in client.get("/config").json()["dependencies"] if d.get("api_name") == "edit")
        join = client.post("/gradio_api/queue/join", json={"data": data, "fn_index": fn_index, "session_hash": "s1"})  # queue
        answers += [join.text, _sse_text(client, "/gradio_api/queue/data?session_hash=s1")]
        uploaded = client.post("/gradio_api/upload", files=[("files", ("a.png", png(), "image/png"))]).json()[0]  # upload + file
        for path in (uploaded + "/../" * 12 + str(secret), str(secret), *map(str, _cached_copies(SECRET))):
            answers.append(client.get(f"/gradio_api/file={path}").text)
    assert all(SECRET not in a for a in answers)
    assert not _cached_copies(SECRET)
    assert not pipe.calls
