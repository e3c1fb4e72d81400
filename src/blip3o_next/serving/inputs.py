"""What a request to the server may carry, checked: the generation parameters (JSON or form fields), uploaded images,
the body and its content type. Every bad input becomes an `ApiError`: a 4xx with one line for the client."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import math
import secrets
import warnings
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from PIL import Image

from ..fileio import to_rgb
from .config import MAX_SEED, ServerConfig

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")  # decoders open to uploads (no EPS/PDF: they shell out)


class ApiError(Exception):
    """A request that cannot be served: an HTTP status, one line for the client, optional headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every failure has one shape, {"error": "one line"}, so a client reads all of them the same way."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


GENERATE_FIELDS = {"prompt", *PARAM_FIELDS}


EDIT_FIELDS = {"image", "instruction", *PARAM_FIELDS}
