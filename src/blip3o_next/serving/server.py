"""`blip3o serve`: one local server with the web demo (gradio) and an HTTP JSON API over one shared pipeline.

    app = create_app(Pipeline.from_pretrained("tiny"), ServerConfig())
    uvicorn.run(app, host="127.0.0.1", port=7860)

Routes:
- `GET /` the web page: "Text to image" and "Edit" tabs, examples, progress, PNG downloads;
- `POST /api/generate` JSON {"prompt", "seed", "steps", "guidance", "num_images", "temperature", "top_k", "top_p"}
  -> {"images": [base64 PNG], "blueprints": [base64 PNG], "seed", ...}, or the first image's PNG bytes with
  `Accept: image/png`;
- `POST /api/edit` multipart (an `image` file, `instruction` and the same parameters as form fields) or JSON with a
  base64 `image`; 501 while the model cannot edit (the pipeline has no `edit` method);
- `GET /health` -> {"status": "ok", "queue": {...}, ...}.

Limits: the model runs one job at a time in one worker thread (the event loop never blocks on it); at most
`queue_size` jobs wait behind it and further requests get 429 with Retry-After at once; a request that has not finished
within `timeout_s` gets 504 (a job still waiting is dropped; a running one finishes in the background, still holding
its queue slot); bodies over `max_body_bytes` get 413. Every bad input is a 4xx with {"error": "one line"}.

Security: requests for a Host name the server does not serve, and browser requests from another origin, get 403 before
any route runs (`SameOriginGuard`); the page's gradio routes accept files from gradio's upload folder only
(`mount_page`); the API routes take JSON (and /api/edit multipart) only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import html
import inspect
import io
import json
import logging
import math
import os
import secrets
import threading
import time
import warnings
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.datastructures import Headers

from ..fileio import MAX_IMAGE_SIDE, to_rgb

log = logging.getLogger(__name__)
T = TypeVar("T")

EXAMPLE_PROMPTS = (
    "a photo of a red circle left of a blue star",
    "a photo of three green triangles",
    'a photo of the word "CAT"',
    "a photo of a yellow square and a purple cross",
    "a photo of two red circles above a blue star",
)
EXAMPLE_INSTRUCTIONS = ("make the green cross bigger", "change the background to white", "remove the blue star")
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # decoders open to uploads (no EPS/PDF: they shell out)
MAX_SEED = 2**63 - 1
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServerConfig:
    """Limits and defaults of one server; every limit answers a clear 4xx/5xx instead of failing."""

    queue_size: int = 16  # jobs that may wait behind the running one; beyond that: 429 at once
    timeout_s: float = 300.0  # per request, waiting + running; beyond that: 504
    read_timeout_s: float = 30.0  # to receive a request body; beyond that: 408
    max_connections: int = 128  # open connections and requests at once (bounds the bodies held in memory); beyond: 503
    max_body_bytes: int = 16 * 2**20  # request bodies and UI uploads; beyond that: 413
    max_image_side: int = MAX_IMAGE_SIDE  # px, for uploaded images; beyond that: 413
    max_prompt_chars: int = 1000  # prompts and instructions; beyond that: 422
    max_steps: int = 100
    max_guidance: float = 20.0
    max_num_images: int = 8
    default_steps: int | None = None  # None: the model's own default
    default_guidance: float | None = None  # None: the model's own default
    model_name: str = "model"  # shown on the page and in /health
    ui: bool = True  # mount the gradio web page at /
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS  # Host header names served ("*": any); others get 403 (DNS rebinding)
    allowed_origins: tuple[str, ...] = ()  # origins besides the server's own whose browser requests are served
    examples: tuple[str, ...] = EXAMPLE_PROMPTS
    edit_examples: tuple[str, ...] = EXAMPLE_INSTRUCTIONS

    def __post_init__(self) -> None:
        if self.queue_size < 0 or self.timeout_s <= 0 or self.read_timeout_s <= 0 or self.max_body_bytes < 1024:
            raise ValueError("need queue_size >= 0, timeout_s > 0, read_timeout_s > 0 and max_body_bytes >= 1024")
        sizes = (self.max_connections, self.max_image_side, self.max_prompt_chars, self.max_steps, self.max_num_images)
        if min(sizes) < 1 or self.max_guidance < 0:
            raise ValueError("need positive max_connections, max_image_side, max_prompt_chars, max_steps, max_num_images "
                             "and max_guidance >= 0")
        if not self.allowed_hosts:
            raise ValueError("need at least one allowed host name")


class ApiError(Exception):
    """A request that cannot be served: an HTTP status, one line for the client, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every failure has one shape, {"error": "one line"}, so a client reads all of them the same way."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ----------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class Params:
    """Validated generation settings of one request."""

    seed: int
    steps: int
    guidance: float
    num_images: int
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None

    def sampling(self) -> dict[str, Any]:
        """AR sampling options the client set (unset ones take the model's defaults)."""
        options = {"temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}
        return {k: v for k, v in options.items() if v is not None}


@dataclass(frozen=True)
class Defaults:
    """Values used when a request leaves a setting out: the server's, else the model's."""

    steps: int
    guidance: float

    @classmethod
    def of(cls, pipe: Any, config: ServerConfig) -> Defaults:
        model_cfg = getattr(getattr(pipe, "model", None), "config", None)
        steps = config.default_steps or getattr(model_cfg, "num_inference_steps", 30)
        guidance = config.default_guidance if config.default_guidance is not None else getattr(model_cfg, "guidance_scale", 2.0)
        return cls(min(int(steps), config.max_steps), min(float(guidance), config.max_guidance))


PARAM_FIELDS = ("seed", "steps", "guidance", "num_images", "temperature", "top_k", "top_p")


def _number(data: dict[str, Any], name: str, kind: type, lo: float, hi: float, *, form: bool, lo_open: bool = False) -> Any:
    """One optional numeric field: its value, or None if absent; 422 naming the field and its range otherwise.
    Form fields arrive as strings and are converted; JSON values must already be numbers (booleans are not)."""
    value = data.get(name)
    if value is None or (form and isinstance(value, str) and not value.strip()):
        return None
    what = "an integer" if kind is int else "a number"
    if form and isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value.strip())
        except ValueError:
            raise ApiError(422, f"{name} must be {what}, got {value[:40]!r}") from None
    if isinstance(value, float) and kind is int and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(422, f"{name} must be {what}, got {json.dumps(value)[:40]}")
    if not math.isfinite(value) or value > hi or value < lo or (lo_open and value == lo):
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ApiError(422, f"{name} must be in {interval}, got {value}")
    return kind(value)


def _text(data: dict[str, Any], name: str, limit: int) -> str:
    """A required, non-empty text field of at most `limit` characters."""
    if name not in data or data[name] is None:
        raise ApiError(422, f"missing field {name!r}")
    value = data[name]
    if not isinstance(value, str):
        raise ApiError(422, f"{name} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ApiError(422, f"{name} is empty")
    if len(value) > limit:
        raise ApiError(422, f"{name} is {len(value)} characters; the limit is {limit}")
    return value


def parse_params(data: dict[str, Any], text_field: str, allowed: set[str], config: ServerConfig, defaults: Defaults,
                 *, form: bool = False) -> tuple[str, Params]:
    """Check one request's fields -> (its text, Params); unknown fields are refused so typos do not pass silently."""
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ApiError(422, f"unknown field {unknown[0]!r}; known fields: {', '.join(sorted(allowed))}")
    text = _text(data, text_field, config.max_prompt_chars)
    seed = _number(data, "seed", int, 0, MAX_SEED, form=form)
    steps = _number(data, "steps", int, 1, config.max_steps, form=form)
    guidance = _number(data, "guidance", float, 0, config.max_guidance, form=form)
    num_images = _number(data, "num_images", int, 1, config.max_num_images, form=form)
    params = Params(
        seed=secrets.randbelow(2**31) if seed is None else seed,
        steps=defaults.steps if steps is None else steps,
        guidance=defaults.guidance if guidance is None else guidance,
        num_images=1 if num_images is None else num_images,
        temperature=_number(data, "temperature", float, 0, 10, form=form),
        top_k=_number(data, "top_k", int, 1, 1_000_000, form=form),
        top_p=_number(data, "top_p", float, 0, 1, form=form, lo_open=True),
    )
    return text, params


# ----------------------------------------------------------------------------- images


def decode_image(data: bytes, max_side: int) -> Image.Image:
    """Uploaded bytes -> an RGB image; 413 when too large (checked before decoding), 415 when not an image."""
    if not data:
        raise ApiError(415, "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as im:
                w, h = im.size
                if max(w, h) > max_side:
                    raise ApiError(413, f"the image is {w}x{h} px; the limit is {max_side} px a side")
                im.load()
                return to_rgb(im)
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise ApiError(413, "the image is too large to decode safely") from None
    except (OSError, ValueError, SyntaxError, EOFError, TypeError) as e:  # unidentified, truncated or corrupt files
        reason = str(e).split("\n")[0][:120] or type(e).__name__
        if "cannot identify image file" in reason:
            reason = "unrecognized file format"
        raise ApiError(415, f"not a readable image ({reason}); send PNG, JPEG, WebP, BMP, GIF or TIFF") from None


def decode_base64(value: Any, name: str = "image") -> bytes:
    """Base64 text, optionally a data URL (data:image/png;base64,...) -> bytes; 422/400 otherwise."""
    if not isinstance(value, str):
        raise ApiError(422, f"{name} must be a base64 string, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{name} is not valid base64") from None


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- the worker


class GenerationWorker:
    """Runs jobs on the shared model one at a time in one thread, so requests never race on its weights and the
    event loop stays free. Admits at most 1 running + `queue_size` waiting jobs; past that, 429 at once."""

    def __init__(self, queue_size: int, timeout_s: float):
        self.queue_size, self.timeout_s = queue_size, timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blip3o-generate")
        self._lock = threading.Lock()  # guards the counters (touched from the loop and the worker thread)
        self._admitted = 0  # running + waiting; released when the job really ends, not when its request gives up
        self._running = 0
        self._completed = 0
        self._rejected = 0
        self._timed_out = 0
        self._mean_s: float | None = None  # running mean of job durations, for Retry-After

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"running": self._running, "waiting": self._admitted - self._running, "capacity": 1 + self.queue_size,
                    "completed": self._completed, "rejected": self._rejected, "timed_out": self._timed_out,
                    "mean_job_s": None if self._mean_s is None else round(self._mean_s, 3)}

    def retry_after(self) -> int:
        """Seconds until a slot is likely free: when the queue is full, that is about one job's time."""
        with self._lock:
            return int(min(600, max(1, math.ceil(self._mean_s or 1.0))))

    def _admit(self) -> bool:
        with self._lock:
            if self._admitted >= 1 + self.queue_size:
                self._rejected += 1
                return False
            self._admitted += 1
            return True

    def _release(self, _future: Future) -> None:
        with self._lock:
            self._admitted -= 1

    def _timed(self, fn: Callable[[], T]) -> T:
        with self._lock:
            self._running += 1
        start = time.perf_counter()
        try:
            return fn()
        finally:
            took = time.perf_counter() - start
            with self._lock:
                self._running -= 1
                self._completed += 1
                self._mean_s = took if self._mean_s is None else 0.8 * self._mean_s + 0.2 * took

    async def run(self, fn: Callable[[], T]) -> T:
        """Queue `fn` and await its result: 429 when full, 504 past the timeout, 503 while shutting down."""
        if not self._admit():
            raise ApiError(429, f"the server is busy ({1 + self.queue_size} requests queued or running); retry later",
                           {"Retry-After": str(self.retry_after())})
        ctx = contextvars.copy_context()  # carries gradio's progress tracker into the worker thread
        try:
            future = self._executor.submit(ctx.run, self._timed, fn)
        except RuntimeError:
            self._release(Future())
            raise ApiError(503, "the server is shutting down", {"Retry-After": "5"}) from None
        future.add_done_callback(self._release)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            future.cancel()  # drops it if it is still waiting; a running job ends on its own
            with self._lock:
                self._timed_out += 1
            raise ApiError(504, f"the request did not finish within the server's {self.timeout_s:g} s timeout; "
                           "try fewer steps or images, or retry when the queue is shorter") from None

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- model calls (run in the worker)


@dataclass
class Result:
    images: list[Image.Image]
    previews: list[Image.Image]
    params: Params
    seconds: float = 0.0
    pngs: list[bytes] = field(default_factory=list)
    preview_pngs: list[bytes] = field(default_factory=list)


def run_generate(pipe: Any, prompt: str, params: Params, progress: bool = False) -> Result:
    """One request's images: a batch of `num_images` copies of the prompt from one seeded generator."""
    start = time.perf_counter()
    out = pipe([prompt] * params.num_images, seed=params.seed, num_inference_steps=params.steps,
               guidance_scale=params.guidance, progress=progress, **params.sampling())
    return Result(list(out.images), list(out.blueprint_previews), params, time.perf_counter() - start)


def _edit_kwargs(edit: Callable, params: Params, seed: int) -> dict[str, Any]:
    """Keyword arguments for `pipe.edit`; AR sampling options only if the client set them and edit takes them."""
    kwargs: dict[str, Any] = {"seed": seed, "num_inference_steps": params.steps, "guidance_scale": params.guidance}
    try:
        accepted = inspect.signature(edit).parameters
    except (TypeError, ValueError):
        accepted = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for name, value in params.sampling().items():
        if not (takes_any or name in accepted):
            raise ValueError(f"this model's edit does not take {name}")
        kwargs[name] = value
    return kwargs


def run_edit(pipe: Any, image: Image.Image, instruction: str, params: Params) -> Result:
    """One request's edits: `num_images` calls of `pipe.edit`, with seeds seed, seed + 1, ..."""
    start = time.perf_counter()
    images, previews = [], []
    for i in range(params.num_images):
        out = pipe.edit(image, instruction, **_edit_kwargs(pipe.edit, params, (params.seed + i) % (MAX_SEED + 1)))
        images += list(out.images)
        previews += list(out.blueprint_previews)
    return Result(images, previews, params, time.perf_counter() - start)


def encoded(result: Result) -> Result:
    """PNG-encode a result's images (done in the worker thread, so the event loop stays free)."""
    result.pngs = [png_bytes(im) for im in result.images]
    result.preview_pngs = [png_bytes(im) for im in result.previews]
    return result


def can_edit(pipe: Any) -> bool:
    """Whether the model edits (it went through edit SFT); if not, the route and the tab say so instead of failing."""
    return callable(getattr(pipe, "edit", None)) and bool(getattr(pipe, "can_edit", True))


NO_EDIT = "this model cannot edit: it was not trained to (no edit SFT); text-to-image works"


# ----------------------------------------------------------------------------- HTTP


async def read_body(request: Request, config: ServerConfig) -> bytes:
    """The whole body, refusing more than `max_body_bytes` (413, by header or while streaming) and slow senders (408)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "invalid Content-Length header")
        if int(declared) > config.max_body_bytes:
            raise ApiError(413, f"the request body is {int(declared)} bytes; the limit is {config.max_body_bytes}")

    async def collect() -> bytes:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise ApiError(413, f"the request body is over the {config.max_body_bytes}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)

    try:
        return await asyncio.wait_for(collect(), config.read_timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise ApiError(408, f"the request body did not arrive within {config.read_timeout_s:g} s") from None


def media_type(request: Request) -> str:
    """The request's Content-Type without parameters, lower case ("" when absent)."""
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_content_type(request: Request, accepted: tuple[str, ...]) -> None:
    """415 unless the body is one of `accepted`. JSON routes insist on application/json: a browser sends a
    cross-site text/plain POST without asking first (a "simple" request), but never a JSON one."""
    if media_type(request) not in accepted:
        got = request.headers.get("content-type") or "none"
        raise ApiError(415, f"{request.url.path} takes Content-Type {' or '.join(accepted)}, got {got[:60]}")


def parse_json(body: bytes) -> dict[str, Any]:
    """A JSON object, or 400 saying what is wrong with it."""
    if not body.strip():
        raise ApiError(400, "empty request body; send a JSON object")
    try:
        data = json.loads(body)
    except UnicodeDecodeError:
        raise ApiError(400, "malformed JSON: the body is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ApiError(400, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise ApiError(400, "malformed JSON: nested too deeply") from None
    except ValueError:  # Python refuses to convert integers of over 4,300 digits (sys.get_int_max_str_digits)
        raise ApiError(400, "malformed JSON: a number has too many digits") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the body must be a JSON object, got {type(data).__name__}")
    return data


async def parse_multipart(request: Request, body: bytes, config: ServerConfig) -> tuple[dict[str, Any], bytes | None]:
    """Form fields and the `image` file's bytes of an already-read multipart body."""
    async def replay() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=1, max_fields=32, max_part_size=config.max_body_bytes)
    except Exception as e:  # noqa: BLE001 - starlette raises its HTTPException or the parser's own errors on bad bodies
        raise ApiError(400, f"malformed multipart body ({getattr(e, 'detail', None) or e})") from None
    try:
        fields, image = {}, None
        for key, value in form.multi_items():
            if key == "image":
                if isinstance(value, str):
                    raise ApiError(422, "image must be a file upload (multipart file part), not a text field")
                image = await value.read()
            else:
                fields[key] = value
        return fields, image
    finally:
        await form.close()


def wants_png(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    return "image/png" in accept and "application/json" not in accept


def result_response(request: Request, result: Result) -> Response:
    """JSON with base64 PNGs, or the first image's PNG bytes for `Accept: image/png`."""
    p = result.params
    if wants_png(request):
        headers = {"X-Seed": str(p.seed), "X-Images": str(len(result.pngs))}
        return Response(result.pngs[0], media_type="image/png", headers=headers)
    return JSONResponse({
        "images": [base64.b64encode(b).decode("ascii") for b in result.pngs],
        "blueprints": [base64.b64encode(b).decode("ascii") for b in result.preview_pngs],
        "seed": p.seed, "steps": p.steps, "guidance": p.guidance, "num_images": p.num_images,
        **p.sampling(), "seconds": round(result.seconds, 3),
    })


async def call_model(worker: GenerationWorker, job: Callable[[], Result]) -> Result:
    """Run a model call in the worker; its ValueErrors (bad input the checks above did not catch) become 422s and
    anything else a 500, without taking the server down."""
    try:
        return await worker.run(job)
    except ApiError:
        raise
    except ValueError as e:
        raise ApiError(422, str(e).split("\n")[0] or "invalid input") from None
    except Exception as e:
        log.exception("generation failed")
        first = str(e).splitlines()[0][:200] if str(e) else ""
        raise ApiError(500, f"generation failed ({type(e).__name__}: {first})") from None


GENERATE_FIELDS = {"prompt", *PARAM_FIELDS}
EDIT_FIELDS = {"image", "instruction", *PARAM_FIELDS}
API_ROUTES = {"/api/generate": "POST", "/api/edit": "POST"}


def add_api_routes(app: FastAPI, pipe: Any, config: ServerConfig, worker: GenerationWorker) -> None:
    """The JSON API and the health check."""
    defaults = Defaults.of(pipe, config)

    @app.exception_handler(ApiError)
    async def on_api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": config.model_name, "edit": can_edit(pipe), "queue": worker.stats(),
                             "rss_mb": rss_mb(), "limits": limits(config), "defaults": asdict(defaults)})

    @app.post("/api/generate")
    async def generate(request: Request) -> Response:
        require_content_type(request, ("application/json",))
        data = parse_json(await read_body(request, config))
        prompt, params = parse_params(data, "prompt", GENERATE_FIELDS, config, defaults)
        result = await call_model(worker, lambda: encoded(run_generate(pipe, prompt, params)))
        return result_response(request, result)

    @app.post("/api/edit")
    async def edit(request: Request) -> Response:
        require_content_type(request, ("application/json", "multipart/form-data"))
        body = await read_body(request, config)
        if media_type(request) == "multipart/form-data":
            data, raw = await parse_multipart(request, body, config)
            form = True
        else:
            data = parse_json(body)
            value = data.pop("image", None)
            raw = None if value is None else decode_base64(value)
            form = False
        instruction, params = parse_params(data, "instruction", EDIT_FIELDS - {"image"}, config, defaults, form=form)
        if raw is None:
            raise ApiError(422, "missing field 'image' (a file part, or base64 in JSON)")
        image = await anyio.to_thread.run_sync(decode_image, raw, config.max_image_side)
        if not can_edit(pipe):
            raise ApiError(501, NO_EDIT)
        result = await call_model(worker, lambda: encoded(run_edit(pipe, image, instruction, params)))
        return result_response(request, result)

    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])
    async def api_fallback(request: Request) -> JSONResponse:
        path = request.url.path
        if path in API_ROUTES:
            return error_response(405, f"{path} takes {API_ROUTES[path]} only", {"Allow": API_ROUTES[path]})
        return error_response(404, f"no API route {path}; the routes are POST /api/generate, POST /api/edit, GET /health")


def limits(config: ServerConfig) -> dict[str, Any]:
    """The limits in force, shown by /health so that clients (and the load test) know what they are up against."""
    names = ("queue_size", "timeout_s", "max_connections", "max_body_bytes", "max_image_side", "max_prompt_chars", "max_steps",
             "max_guidance", "max_num_images")
    return {k: getattr(config, k) for k in names}


def rss_mb() -> float | None:
    """This process's resident memory now (Linux), for watching it stay steady under load."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        return None


# ----------------------------------------------------------------------------- the web page


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


# ----------------------------------------------------------------------------- the app


def create_app(pipe: Any, config: ServerConfig | None = None) -> FastAPI:
    """One server over one shared, already-loaded pipeline: the API routes, then (optionally) the web page at /."""
    config = config or ServerConfig()
    worker = GenerationWorker(config.queue_size, config.timeout_s)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            worker.shutdown()

    app = FastAPI(title="BLIP3o-NEXT", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.worker, app.state.config, app.state.pipe = worker, config, pipe
    add_api_routes(app, pipe, config, worker)
    if config.ui:
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page must not phone home
        mount_page(app, build_ui(pipe, config, worker), config)
    app.add_middleware(SameOriginGuard, allowed_hosts=config.allowed_hosts, allowed_origins=config.allowed_origins)
    return app


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


class SameOriginGuard:
    """ASGI middleware that refuses, before any route runs (the page's included), requests addressed to a Host name
    the server does not serve (DNS rebinding: a site whose name resolves to 127.0.0.1) and requests whose Origin is
    another site (a page elsewhere posting to this server from the user's browser). Requests without an Origin header
    (curl, scripts) pass: only browsers send it, and they always do on cross-site POSTs.

    Hand-written because starlette's TrustedHostMiddleware checks only the Host and answers in plain text; this
    server answers every refusal as {"error": ...}."""

    def __init__(self, app: Any, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...] = ()):
        self.app = app
        self.any_host = "*" in allowed_hosts
        self.allowed_hosts = {h.lower().strip("[]") for h in allowed_hosts}
        self.allowed_origins = {o.lower().rstrip("/") for o in allowed_origins}

    def refusal(self, headers: Any) -> str | None:
        """Why a request with these headers is refused, or None when it may go on."""
        host = headers.get("host", "")
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:
            name = None
        if not host or name is None:
            return "missing or invalid Host header"
        if not (self.any_host or name in self.allowed_hosts):
            return (f"host {name!r} is not served here (allowed: {', '.join(sorted(self.allowed_hosts))}; "
                    "blip3o serve --allowed-host NAME adds one)")
        origin = headers.get("origin")
        if origin is not None:
            origin = origin.lower().rstrip("/")
            own = urlsplit(origin).netloc if "://" in origin else None
            if own != host.lower() and origin not in self.allowed_origins:
                return (f"cross-origin request from {origin[:80]!r} refused "
                        "(blip3o serve --allowed-origin ORIGIN lets a site call this server)")
        return None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] in ("http", "websocket"):
            reason = self.refusal(Headers(scope=scope))
            if reason is not None:
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
                else:
                    await error_response(403, reason)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    """Whether `host` is only reachable from this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def served_host_names(listen: str, extra: list[str] | tuple[str, ...] = ()) -> tuple[str, ...]:
    """The Host names a server listening on `listen` answers: the loopback names, the address itself unless it is a
    wildcard (0.0.0.0, ::), and `extra`."""
    names = [*LOOPBACK_HOSTS, *extra]
    if listen not in ("0.0.0.0", "::", ""):
        names.append(listen)
    return tuple(dict.fromkeys(n.lower().strip("[]") for n in names))


def serve(pipe: Any, config: ServerConfig, host: str = "127.0.0.1", port: int = 7860, log_level: str = "info") -> None:
    """Run the server until interrupted (Ctrl-C)."""
    import uvicorn

    if not is_loopback(host):
        log.warning("listening on %s: the server has no authentication; anyone who can reach this address can use it", host)
    uvicorn.run(create_app(pipe, config), host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                limit_concurrency=config.max_connections)
