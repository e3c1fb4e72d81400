"""ShapeWorld v1: the vocabulary and the scene description (choices beyond it: docs/design.md, "ShapeWorld").

Every length in the contract is given at the reference canvas S = 64 and scales with S.
Scenes store geometry in pixels of their own canvas, so a scene is self-contained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any, Iterable

REFERENCE_SIZE = 64  # the canvas size at which the contract states its lengths
MIN_CANVAS, MAX_CANVAS = 32, 512

BACKGROUNDS = MappingProxyType({"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)})
DEFAULT_BACKGROUND = "white"

COLORS = MappingProxyType(
    {
        "red": (220, 30, 30),
        "orange": (245, 135, 20),
        "yellow": (240, 220, 30),
        "green": (30, 160, 60),
        "cyan": (30, 200, 220),
        "blue": (30, 70, 220),
        "purple": (140, 50, 190),
        "pink": (245, 120, 190),
    }
)
# Text defaults to black ink on white/gray and white ink on black (a named color overrides it).
TEXT_INK = MappingProxyType({"black": (0, 0, 0), "white": (255, 255, 255)})

SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
STAR_INNER_RATIO = 0.45

# Side s of the shape's square box, in px at S = 64 (inclusive integer ranges).
SIZE_RANGES = MappingProxyType({"small": (10, 13), "medium": (14, 18), "large": (19, 24)})
UNNAMED_SIZE_RANGE = (12, 20)
CAP_HEIGHT_RANGE = (10, 14)  # text capital height, px at S = 64
MAX_WORD_LEN = 4

MARGIN = 2  # px at S = 64: distance to the canvas edge, and the gap between boxes
MAX_OBJECTS = 6  # shapes plus the text object
RELATION_MARGIN_FRACTION = 1 / 8  # m = S / 8
RELATIONS = ("left of", "right of", "above", "below")
REGIONS = ("left side", "right side", "top", "bottom", "center")


def scale(canvas: int) -> float:
    """Pixels of this canvas per pixel of the reference canvas."""
    return canvas / REFERENCE_SIZE


def check_canvas(canvas: int) -> None:
    if not (MIN_CANVAS <= int(canvas) <= MAX_CANVAS):
        raise ValueError(f"canvas size S={canvas} is outside [{MIN_CANVAS}, {MAX_CANVAS}]")


def default_text_color(background: str) -> str:
    return "white" if background == "black" else "black"


def size_class(size: float, canvas: int) -> str:
    """Name the size class of a box side, splitting the gaps between the contract's ranges evenly."""
    s64 = size / scale(canvas)
    if s64 < (SIZE_RANGES["small"][1] + SIZE_RANGES["medium"][0]) / 2:
        return "small"
    if s64 < (SIZE_RANGES["medium"][1] + SIZE_RANGES["large"][0]) / 2:
        return "medium"
    return "large"


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in canvas pixels, x1/y1 exclusive edges."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def cx(self) -> float:
        return (self.x0 + self.x1) / 2

    @property
    def cy(self) -> float:
        return (self.y0 + self.y1) / 2

    def gap_to(self, other: "Box") -> float:
        """Chebyshev gap between two boxes (negative when they overlap)."""
        dx = max(other.x0 - self.x1, self.x0 - other.x1)
        dy = max(other.y0 - self.y1, self.y0 - other.y1)
        return max(dx, dy)

    def dilate(self, d: float) -> "Box":
        return Box(self.x0 - d, self.y0 - d, self.x1 + d, self.y1 + d)


@dataclass(frozen=True)
class ShapeObject:
    """A flat-filled shape inside the square box of side `size` centred at (cx, cy)."""

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    @property
    def box(self) -> Box:
        h = self.size / 2
        return Box(self.cx - h, self.cy - h, self.cx + h, self.cy + h)


@dataclass(frozen=True)
class TextObject:
    """An uppercase word whose ink box (width x height) is centred at (cx, cy)."""

    word: str
    color: str
    cx: float
    cy: float
    cap_height: float  # capital height in canvas px
    width: float  # ink box, canvas px (measured from the font when the object is made)
    height: float

    @property
    def box(self) -> Box:
        return Box(self.cx - self.width / 2, self.cy - self.height / 2, self.cx + self.width / 2, self.cy + self.height / 2)


@dataclass(frozen=True)
class Scene:
    canvas: int
    background: str = DEFAULT_BACKGROUND
    objects: tuple[ShapeObject, ...] = field(default_factory=tuple)
    text: TextObject | None = None

    def boxes(self) -> list[Box]:
        return [o.box for o in self.objects] + ([self.text.box] if self.text else [])

    def with_objects(self, objects: Iterable[ShapeObject]) -> "Scene":
        return replace(self, objects=tuple(objects))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        try:
            text = TextObject(**d["text"]) if d.get("text") else None
            objects = tuple(ShapeObject(**o) for o in d.get("objects", ()))
            scene = cls(canvas=int(d["canvas"]), background=d.get("background", DEFAULT_BACKGROUND), objects=objects, text=text)
        except (KeyError, TypeError) as e:
            raise ValueError(f"not a ShapeWorld scene: {e}") from None
        scene.validate_vocabulary()
        return scene

    def validate_vocabulary(self) -> None:
        check_canvas(self.canvas)
        if self.background not in BACKGROUNDS:
            raise ValueError(f"unknown background {self.background!r}")
        for o in self.objects:
            if o.shape not in SHAPES or o.color not in COLORS:
                raise ValueError(f"unknown shape/color {o.shape!r}/{o.color!r}")
        if self.text and self.text.color not in COLORS and self.text.color not in TEXT_INK:
            raise ValueError(f"unknown text color {self.text.color!r}")


# Generated scenes keep relations and regions with this much to spare (px at S = 64), so that a parse a
# fraction of a pixel off still verifies; checks of images use no slack.
SAMPLING_SLACK = 1.0


def relation_holds(a: Box, relation: str, b: Box, canvas: int, slack: float = 0.0) -> bool:
    """`a {relation} b` on box centers with margin m = S/8 (plus `slack` px at S = 64)."""
    m = canvas * RELATION_MARGIN_FRACTION + slack * scale(canvas)
    if relation == "left of":
        return b.cx - a.cx >= m
    if relation == "right of":
        return a.cx - b.cx >= m
    if relation == "above":
        return b.cy - a.cy >= m
    if relation == "below":
        return a.cy - b.cy >= m
    raise ValueError(f"unknown relation {relation!r}")


def region_holds(box: Box, region: str, canvas: int, slack: float = 0.0) -> bool:
    """Whether the box center lies in the region (at least `slack` px at S = 64 inside its border)."""
    x, y, s, d = box.cx, box.cy, canvas, slack * scale(canvas)
    if region == "left side":
        return x < 0.4 * s - d
    if region == "right side":
        return x > 0.6 * s + d
    if region == "top":
        return y < 0.4 * s - d
    if region == "bottom":
        return y > 0.6 * s + d
    if region == "center":
        return 0.35 * s + d <= x <= 0.65 * s - d and 0.35 * s + d <= y <= 0.65 * s - d
    raise ValueError(f"unknown region {region!r}")
