"""How local are an image tokenizer's codes? The share of codes an edit changes, against the cells it changes.

    python benchmarks/tokenizer_locality.py                                  # the bundled tiny model's tokenizer
    python benchmarks/tokenizer_locality.py --tokenizer runs/tiny-groupnorm-tok/image_tokenizer/final  # the GroupNorm form

For each pair of the canonical edit suite, the true source and target images are encoded. "Content cells" are the
cells whose semantic labels (color class, shape class) differ between the two scenes. An edit that moves one object
should change the codes of a few cells; every other changed code is one the AR model must rewrite although nothing
there changed, and one that blueprint-preserving edits (`edit_preserve_unchanged`) cannot keep. The last line is
the semantic head's accuracy on the sources' cells, and the preview decoder's reconstruction error.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from blip3o_next.models.image_tokenizer import NUM_COLOR_CLASSES, ImageTokenizer, cell_labels, images_to_tensor, semantic_batch
from blip3o_next.pipeline import resolve_model_path
from blip3o_next.shapeworld.edits import edit_suite
from blip3o_next.shapeworld.render import render


def content_changes(pairs, grid: int) -> torch.Tensor:
    """(N, grid * grid) True where a cell's color or shape class differs between source and target."""
    rows = []
    for p in pairs:
        (c1, s1), (c2, s2) = cell_labels(p.source, grid), cell_labels(p.target, grid)
        rows.append(((c1 != c2) | (s1 != s2)).reshape(-1))
    return torch.as_tensor(np.stack(rows))


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", help="an ImageTokenizer folder (default: the bundled tiny model's)")
    parser.add_argument("--per-category", type=int, default=20, help="edit pairs per category")
    args = parser.parse_args()
    tok = ImageTokenizer.from_pretrained(args.tokenizer or resolve_model_path("tiny") / "image_tokenizer").float().eval()
    pairs = edit_suite(args.per_category, seed=0)
    sources = images_to_tensor(np.stack([render(p.source) for p in pairs]))
    source_codes = tok.encode(sources)
    target_codes = tok.encode(images_to_tensor(np.stack([render(p.target) for p in pairs])))
    changed, content = source_codes != target_codes, content_changes(pairs, tok.grid)
    categories = [p.spec.category for p in pairs]
    print(f"tokenizer: norm={tok.config.norm}, encoder_kernel_size={tok.config.encoder_kernel_size}, grid {tok.grid}x{tok.grid}")
    print(f"{'category':<12}{'codes changed':>15}{'content cells':>15}{'codes changed, content not':>28}")
    for category in dict.fromkeys(categories):
        rows = [i for i, c in enumerate(categories) if c == category]
        same = ~content[rows]
        spurious = (changed[rows] & same).sum().item() / max(1, same.sum().item())
        print(f"{category:<12}{changed[rows].float().mean().item():>15.3f}{content[rows].float().mean().item():>15.3f}{spurious:>28.3f}")
    colors, shapes, _ = semantic_batch([p.source for p in pairs], tok.grid)
    logits = tok.cell_head(tok.codes_from_indices(source_codes))
    color_ok = logits[:, :NUM_COLOR_CLASSES].argmax(1) == colors
    shape_ok = logits[:, NUM_COLOR_CLASSES:].argmax(1) == shapes
    objects = colors > 0
    mse = torch.nn.functional.mse_loss(tok(sources).reconstruction, sources).item()
    print(f"semantic accuracy on object cells: color {color_ok[objects].float().mean().item():.3f}, shape "
          f"{shape_ok[objects].float().mean().item():.3f}; preview reconstruction MSE {mse:.4f}")


if __name__ == "__main__":
    main()
