"""Image grids for samples and evaluations: tiles upscaled without smoothing, a green/red frame for
pass/fail, and a caption under each tile."""

from __future__ import annotations

import textwrap
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PASS_RGB, FAIL_RGB, NEUTRAL_RGB = (40, 170, 70), (220, 40, 40), (200, 200, 200)


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    captions: Sequence[str] | None = None,
    passed: Sequence[bool | None] | None = None,
    tile: int = 128,
    columns: int = 1,
    caption_lines: int = 3,
) -> Image.Image:
    """A grid of cells; each cell shows one or more images side by side (e.g. source | output).

    `rows[i]` is the list of images of cell i; cells are laid out `columns` per row.
    """
    font = ImageFont.load_default(size=11)
    border, gap = 4, 4  # frame width; space between the images of one cell
    n = len(rows)
    per_cell = max(len(r) for r in rows) if rows else 1
    cell_w = per_cell * tile + (per_cell - 1) * gap + 2 * border
    line_h = 13
    cell_h = tile + 2 * border + caption_lines * line_h + 4
    cols = max(1, min(columns, n))
    nrows = max(1, -(-n // cols))
    canvas = Image.new("RGB", (cols * cell_w, nrows * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    chars = max(8, cell_w // 6)
    for i, images in enumerate(rows):
        x, y = (i % cols) * cell_w, (i // cols) * cell_h
        ok = passed[i] if passed is not None else None
        frame = NEUTRAL_RGB if ok is None else PASS_RGB if ok else FAIL_RGB
        draw.rectangle([x, y, x + cell_w - 1, y + tile + 2 * border - 1], fill=frame)
        for j, img in enumerate(images):
            tile_image = Image.fromarray(np.asarray(img, np.uint8)).resize((tile, tile), Image.NEAREST)
            canvas.paste(tile_image, (x + border + j * (tile + gap), y + border))
        if captions is not None:
            label = ("PASS  " if ok else "FAIL  " if ok is not None else "") + captions[i]
            for k, line in enumerate(textwrap.wrap(label, chars)[:caption_lines]):
                draw.text((x + border, y + tile + 2 * border + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def stack_vertically(images: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Images one above the other on white, left-aligned (e.g. two grids of different widths)."""
    canvas = Image.new("RGB", (max(im.width for im in images), sum(im.height for im in images) + gap * (len(images) - 1)), (255, 255, 255))
    y = 0
    for im in images:
        canvas.paste(im, (0, y))
        y += im.height + gap
    return canvas
