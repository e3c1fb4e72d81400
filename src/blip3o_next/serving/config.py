"""`blip3o serve`'s settings: the limits and defaults of one server (`ServerConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from ..fileio import MAX_IMAGE_SIDE

EXAMPLE_PROMPTS = (
    "a photo of a red circle left of a blue star",
    "a photo of three green triangles",
    'a photo of the word "CAT"',
    "a photo of a yellow square and a purple cross",
    "a photo of two red circles above a blue star",
)


EXAMPLE_INSTRUCTIONS = ("make the green cross bigger", "change the background to white", "remove the blue star")


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
