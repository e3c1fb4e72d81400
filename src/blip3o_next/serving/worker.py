"""The model side of the server: one worker thread runs the pipeline one job at a time behind a bounded queue, so the
event loop never blocks on it; the model calls of a generate or edit request."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from PIL import Image

from .config import MAX_SEED
from .inputs import ApiError, Params, png_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")


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


def run_edit(pipe: Any, image: Image.Image, instruction: str, params: Params) -> Result:
    """One request's edits: `num_images` calls of `pipe.edit`, with seeds seed, seed + 1, ..."""
    start = time.perf_counter()
    images, previews = [], []
    for i in range(params.num_images):
        out = pipe.edit(image, instruction, seed=(params.seed + i) % (MAX_SEED + 1), num_inference_steps=params.steps,
                        guidance_scale=params.guidance, **params.sampling())
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
