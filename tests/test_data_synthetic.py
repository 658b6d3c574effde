"""Tests of the synthetic shapes detection set: determinism, statistics, schema."""

from collections import Counter

import datasets
import numpy as np
import pytest

from pix2seq_hf.data.schema import get_id2label
from pix2seq_hf.data.synthetic import SHAPE_NAMES, load_synthetic_detection, make_synthetic_detection_dataset


def _raw_images(dataset):
    return [value["bytes"] for value in dataset.cast_column("image", datasets.Image(decode=False))["image"]]


@pytest.fixture(scope="module")
def shapes():
    return make_synthetic_detection_dataset(400, seed=3)


def test_same_seed_gives_byte_identical_images_and_annotations(shapes):
    again = make_synthetic_detection_dataset(400, seed=3)
    assert _raw_images(again) == _raw_images(shapes)
    assert again["objects"] == shapes["objects"]
    # An image depends on (seed, split, index) only, not on how many images are made.
    head = make_synthetic_detection_dataset(5, seed=3)
    assert _raw_images(head) == _raw_images(shapes)[:5]
    other = make_synthetic_detection_dataset(5, seed=4)
    assert all(a != b for a, b in zip(_raw_images(other), _raw_images(head)))


def test_statistics(shapes):
    counts = Counter(len(objects["bbox"]) for objects in shapes["objects"])
    assert min(counts) == 1 and max(counts) == 10
    assert len(counts) == 10  # every count from 1 to 10 occurs
    labels = Counter(label for objects in shapes["objects"] for label in objects["category"])
    assert sorted(labels) == [0, 1, 2, 3, 4]
    assert min(labels.values()) > 0.15 * sum(labels.values())  # roughly balanced
    sides = []
    for objects in shapes["objects"]:
        for (x, y, w, h), area in zip(objects["bbox"], objects["area"]):
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 128 and y + h <= 128
            assert 0 < area <= w * h
            sides.append(max(w, h))
        assert objects["iscrowd"] == [0] * len(objects["bbox"])
        assert len(set(objects["id"])) == len(objects["id"])
    assert min(sides) < 20 and max(sides) > 45  # a range of sizes


def test_schema_and_pixels(shapes):
    assert get_id2label(shapes) == dict(enumerate(SHAPE_NAMES[:5]))
    assert shapes["image_id"] == list(range(400))
    example = shapes[0]
    assert np.asarray(example["image"]).shape == (128, 128, 3) and np.asarray(example["image"]).dtype == np.uint8
    assert (example["width"], example["height"]) == (128, 128)
    # Boxes are tight: in images with one object, the shape's flat colour (the most frequent one in its box) touches
    # all four sides of the box and does not continue past them.
    singles = [i for i, objects in enumerate(shapes["objects"]) if len(objects["bbox"]) == 1]
    assert len(singles) > 10
    for index in singles:
        pixels = np.asarray(shapes[index]["image"]).astype(int)
        x, y, w, h = (int(v) for v in shapes[index]["objects"]["bbox"][0])
        patch = pixels[y : y + h, x : x + w]
        colours, frequency = np.unique(patch.reshape(-1, 3), axis=0, return_counts=True)
        mask = (patch == colours[frequency.argmax()]).all(axis=-1)
        assert mask.mean() > 0.4
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
        grown = (pixels[max(y - 1, 0) : y + h + 1, max(x - 1, 0) : x + w + 1] == colours[frequency.argmax()]).all(-1)
        assert grown.sum() == mask.sum()


def test_splits_are_disjoint_and_options_apply():
    data = load_synthetic_detection(
        train_size=8, validation_size=4, seed=0, image_size=48, num_classes=6, max_objects=3
    )
    assert set(data) == {"train", "validation"}
    assert len(data["train"]) == 8 and len(data["validation"]) == 4
    assert not set(_raw_images(data["train"])) & set(_raw_images(data["validation"]))
    assert get_id2label(data["train"])[5] == "diamond"
    assert all(1 <= len(objects["bbox"]) <= 3 for objects in data["train"]["objects"])
    assert np.asarray(data["validation"][0]["image"]).shape == (48, 48, 3)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        make_synthetic_detection_dataset(2, num_classes=7)
    with pytest.raises(ValueError, match="num_images"):
        make_synthetic_detection_dataset(0)
    with pytest.raises(ValueError, match="min_objects <= max_objects"):
        make_synthetic_detection_dataset(2, min_objects=3, max_objects=2)

