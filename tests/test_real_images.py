"""The real-photograph coins set (pix2seq_hf.data.real_images) and the training benchmark on it."""

import json

import numpy as np
import pytest
from helpers import load_example

from pix2seq_hf.data import build_coins_dataset, load_detection_splits
from pix2seq_hf.data.real_images import SPLIT_ROW, segment_coins


def test_the_segmentation_finds_every_coin_and_the_halves_share_none():
    image, labels = segment_coins()
    assert image.shape == labels.shape == (303, 384)
    assert labels.max() == 24
    top, bottom = set(np.unique(labels[:SPLIT_ROW])) - {0}, set(np.unique(labels[SPLIT_ROW:])) - {0}
    assert len(top) == len(bottom) == 12 and not top & bottom
    # Coins are bright discs: the segmented pixels are brighter than the background.
    assert image[labels > 0].mean() > image[labels == 0].mean() + 50


def test_the_coins_set_is_reproducible_with_many_objects_per_image(tmp_path):
    files = build_coins_dataset(tmp_path / "a", num_train=6, num_validation=3, image_size=192, seed=3)
    build_coins_dataset(tmp_path / "b", num_train=6, num_validation=3, image_size=192, seed=3)
    build_coins_dataset(tmp_path / "c", num_train=6, num_validation=3, image_size=192, seed=4)
    for name in ("train.json", "validation.json"):
        first = json.loads((tmp_path / "a" / name).read_text())
        assert json.loads((tmp_path / "b" / name).read_text()) == first
        assert json.loads((tmp_path / "c" / name).read_text()) != first
    assert (tmp_path / "a/images/train_001.png").read_bytes() == (tmp_path / "b/images/train_001.png").read_bytes()

    splits = load_detection_splits(
        coco_annotations=files["train_annotations"], coco_images=files["images"],
        validation_coco_annotations=files["validation_annotations"], validation_coco_images=files["images"],
    )  # fmt: skip
    assert splits.id2label == {0: "coin"} and (len(splits.train), len(splits.validation)) == (6, 3)
    for example in list(splits.train) + list(splits.validation):
        boxes = np.array(example["objects"]["bbox"]).reshape(-1, 4)
        assert (example["width"], example["height"]) == (192, 192)
        assert len(boxes) >= 8  # four tiles of several coins each
        assert (boxes[:, :2] >= 0).all() and (boxes[:, :2] + boxes[:, 2:] <= 192).all()
    with pytest.raises(ValueError, match="image_size must be an even number"):
        build_coins_dataset(tmp_path / "d", image_size=33)


def test_training_benchmark_runs_pix2seq_and_fcos_on_the_coins(tmp_path):
    benchmark = load_example("benchmarks/benchmark_training")
    output = tmp_path / "report.json"
    argv = [
        "--dataset", "coins", "--detectors", "pix2seq", "fcos", "--coins_train_size", "4", "--coins_validation_size",
        "2", "--max_train_steps", "2", "--eval_steps", "1", "--batch_size", "2", "--image_size", "64",
        "--num_threads", "1", "--output_file", str(output),
    ]  # fmt: skip
    assert benchmark.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["settings"]["dataset"] == "coins" and set(report["detectors"]) == {"pix2seq", "fcos"}
    for history in report["detectors"].values():
        assert [entry["step"] for entry in history] == [1, 2]
        assert all(0 <= entry["map"] <= 1 for entry in history)
