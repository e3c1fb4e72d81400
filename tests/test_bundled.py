"""Regression tests of the bundled `tiny` model: it loads offline, is small, and still generates and edits above its floors.

The floors sit a few points under the scores this exact check measured when the weights were committed
(see README "Results"); a change that breaks generation quality fails here.
"""

import numpy as np
import pytest
import torch
from safetensors import safe_open

from blip3o_next.eval.suites import evaluate_edits, evaluate_t2i, generate_edit_items, generate_t2i_items, geneval_suite, plan_summary
from blip3o_next.pipeline import BUNDLED_MODELS, Pipeline
from blip3o_next.shapeworld.edits import edit_suite

WEIGHT_LIMIT_MB = 60
# Measured on the committed `tiny` weights (semantic blueprint: SFT, 150 GRPO steps on plan rewards, edit SFT, 100
# GRPO steps, 1,500 steps of the AR-only edit planner on exact references, nearly all edits, 100 more GRPO steps,
# 2 x 1,200 steps of the renderer with the glyph condition, 80 GRPO steps on both tasks' plans) at their defaults
# (the best of 8 blueprints drawn level by level, ids within their kind at temperature 0.5; 6 diffusion steps) with
# the suite below (per_category=4, suite_seed=7, seed=0, batch 16): overall 1.000 (strict pass, six GenEval
# categories), mean partial credit 0.912 over all eight, text partial 0.813 (0.500 without the glyph condition: the
# floor catches it), dense partial 0.485, plan score of the generated blueprints 1.000. One image moves `overall`
# by 0.04; floors sit two images below.
FLOORS = {"overall": 0.92, "partial": 0.85, "text_partial": 0.65, "dense_partial": 0.40, "plan": 0.92}
# Measured on the same weights at their defaults (edits keep what their blueprint keeps and paste the reference's
# pixels back there) with edit_suite(3, seed=7), seed 0, batch 16: success 0.778 (21 of 27), keep 3/3, mean
# consistency PSNR 71.8 dB (identical pixels count as 100 dB), 21 of 21 successes at >= 30 dB. Floors: two edits
# fewer, one keep fewer, 7.4 dB lower, two consistent successes fewer.
EDITS_PER_CATEGORY = 3
EDIT_FLOORS = {"success": 0.70, "keep": 0.66, "psnr": 60.0, "consistent": 0.90}


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.from_pretrained("tiny")


def test_bundled_weights_are_small_float16_safetensors():
    files = [f for root in BUNDLED_MODELS.values() for f in root.rglob("*")]
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pkl", ".pth")]
    assert sum(f.stat().st_size for f in files if f.is_file()) < WEIGHT_LIMIT_MB * 2**20  # all bundled models together
    root = BUNDLED_MODELS["tiny"]
    parts = {"image_tokenizer", "ar", "image_embedding", "connector", "reference_connector", "transformer", "vae",
             "reader_ar", "reader_embedding"}  # the reader: the AR side the renderer was trained on, re-reading each blueprint
    assert {f.parent.name for f in root.rglob("*.safetensors")} == parts
    with safe_open(str(root / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert f.get_tensor(next(iter(f.keys()))).dtype.itemsize == 2


def test_bundled_model_generates_deterministically(pipe):
    a = pipe(["a photo of a red circle left of a blue star", "a photo of two yellow squares"], seed=1)
    b = pipe(["a photo of a red circle left of a blue star", "a photo of two yellow squares"], seed=1)
    assert a.images[0].size == (64, 64) and np.array_equal(np.asarray(a.images[1]), np.asarray(b.images[1]))
    assert next(pipe.model.transformer.parameters()).dtype.itemsize == 4  # stored in float16, run in float32


def test_bundled_model_scores_above_its_floors(pipe):
    prompts, counts = geneval_suite(4, seed=7)
    items = generate_t2i_items(pipe, prompts, counts, seed=0, batch_size=16, progress=False)
    _, summary = evaluate_t2i(items)
    categories = summary["categories"]
    scores = {
        "overall": summary["overall"],
        "partial": sum(c["partial"] for c in categories.values()) / len(categories),
        "text_partial": categories["text"]["partial"],
        "dense_partial": categories["dense"]["partial"],
        "plan": plan_summary(items)["overall"],
    }
    for name, floor in FLOORS.items():
        assert scores[name] >= floor, (name, scores)


def test_bundled_model_edits_above_its_floors(pipe):
    assert pipe.can_edit
    items = generate_edit_items(pipe, edit_suite(EDITS_PER_CATEGORY, seed=7), seed=0, batch_size=16, progress=False)
    _, summary = evaluate_edits(items)
    overall = summary["overall"]
    scores = {"success": overall["success"], "keep": summary["categories"]["keep"]["success"], "psnr": overall["psnr"],
              "consistent": overall["consistent_successes"]}
    for name, floor in EDIT_FLOORS.items():
        assert scores[name] >= floor, (name, scores)
