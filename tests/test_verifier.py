"""The verifier reads renders essentially perfectly and keeps reading degraded ones (the targets of docs/benchmarks.md)."""

import numpy as np
import pytest

from blip3o_next.shapeworld.render import render
from blip3o_next.shapeworld.sampler import sample_scene
from blip3o_next.shapeworld.world import Scene, ShapeObject
from blip3o_next.eval.verifier import SceneParser
from blip3o_next.eval.verifier.accuracy import verifier_accuracy

FLOORS = {"clean": 0.995, "blur": 0.97, "noise": 0.97, "jpeg": 0.97, "drift": 0.97, "combined": 0.93}


@pytest.fixture(scope="module")
def accuracy_64():
    return verifier_accuracy(300, 64, degradations=tuple(FLOORS), seed=11)


@pytest.mark.parametrize("degradation", list(FLOORS))
def test_accuracy_floors_at_64(accuracy_64, degradation):
    for field, acc in accuracy_64[degradation].items():
        assert acc >= FLOORS[degradation], f"{degradation}/{field}: {acc:.4f}"


def test_accuracy_at_128():
    acc = verifier_accuracy(60, 128, degradations=("clean", "combined"), seed=12)
    assert min(acc["clean"].values()) >= 0.995 and min(acc["combined"].values()) >= 0.93


def test_batch_equals_single(rng):
    images = np.stack([render(sample_scene(rng, 64)) for _ in range(8)])
    parser = SceneParser()
    assert parser.parse_batch(images) == [parser.parse(img) for img in images]


def test_empty_scene_and_exact_geometry():
    parser = SceneParser()
    assert parser.parse(render(Scene(64, "gray"))) == Scene(64, "gray")
    obj = ShapeObject("triangle", "purple", 20.25, 40.5, 15.0)
    got = parser.parse(render(Scene(64, "gray", (obj,)))).objects[0]
    assert (got.shape, got.color) == ("triangle", "purple")
    assert abs(got.cx - obj.cx) < 0.1 and abs(got.cy - obj.cy) < 0.1 and abs(got.size - obj.size) < 0.2


def test_rejects_non_rgb_batches():
    with pytest.raises(ValueError):
        SceneParser().parse_batch(np.zeros((2, 64, 32, 3), np.uint8))
