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

The parts: `config.py` (ServerConfig), `requests.py` (checking what a request carries), `worker.py` (the model's
thread and queue), `web_ui.py` (the gradio page); this file holds the routes, the app and its guard.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any
from urllib.parse import urlsplit

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import Headers

from .config import LOOPBACK_HOSTS, ServerConfig
from .inputs import (
    EDIT_FIELDS, GENERATE_FIELDS, ApiError, Defaults, decode_base64, decode_image, error_response, media_type, parse_json,
    parse_multipart, parse_params, read_body, require_content_type, wants_png,
)
from .web_ui import build_ui, mount_page
from .worker import NO_EDIT, GenerationWorker, Result, call_model, can_edit, encoded, run_edit, run_generate

log = logging.getLogger(__name__)


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
