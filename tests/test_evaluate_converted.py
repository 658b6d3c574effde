"""`examples/evaluate.py` on a model converted from an official checkpoint: the model's labels are the data's COCO
category ids (gapped: 1, 3, 7), the protocol the official evaluation uses."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pix2seq_hf.convert_pix2seq_original_tf_checkpoint_to_pytorch import convert_pix2seq_checkpoint
from helpers import load_example


FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}, {"id": 7, "name": "train"}]


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    """Four small images with objects of every category, in a COCO json with gapped category ids."""
    root = tmp_path_factory.mktemp("coco")
    images_dir = root / "images"
    images_dir.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for index in range(4):
        height, width = 48, 64
        name = f"image_{index}.png"
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(images_dir / name)
        images.append({"id": 10 + index, "file_name": name, "height": height, "width": width})
        for number, category in enumerate(CATEGORIES):
            x, y = 4 + 12 * number, 6 + 4 * index
            annotations.append(
                {"id": len(annotations) + 1, "image_id": 10 + index, "category_id": category["id"],
                 "bbox": [x, y, 10, 12], "area": 120, "iscrowd": 0}
            )  # fmt: skip
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return annotation_file, images_dir


@pytest.fixture(scope="module")
def converted(tmp_path_factory, coco_set):
    """The tiny official ResNet checkpoint converted with the data's categories: `id2label` keyed by category id."""
    folder = tmp_path_factory.mktemp("converted") / "model"
    convert_pix2seq_checkpoint(
        os.path.join(FIXTURES, "official_tiny_r50"), str(folder), image_size=64, categories_path=str(coco_set[0])
    )
    return folder


def test_converted_model_is_labelled_by_category_id(converted):
    config = json.loads((converted / "config.json").read_text())
    assert {int(k): v for k, v in config["id2label"].items()} == {
        0: "N/A", 1: "person", 2: "N/A", 3: "car", 4: "N/A", 5: "N/A", 6: "N/A", 7: "train"
    }  # fmt: skip


def test_label_space_reads_the_model_labels():
    evaluate = load_example("evaluate")

    class Splits:
        id2label = {0: "person", 1: "car", 2: "train"}
        label2category_id = {0: 1, 1: 3, 2: 7}

    assert evaluate.label_space({0: "person", 1: "car", 2: "train"}, Splits) == "labels"
    assert evaluate.label_space({0: "N/A", 1: "Person", 3: "car", 7: "train", 8: "boat"}, Splits) == "category_ids"
    with pytest.raises(ValueError, match="neither the data's labels"):
        evaluate.label_space({0: "N/A", 1: "person", 3: "bus", 7: "train"}, Splits)

    collator = lambda examples: {"targets": [{"labels": torch.tensor([2, 0, 1])}]}  # noqa: E731
    collate = evaluate.CategoryIdTargets(collator, {0: 1, 1: 3, 2: 7})
    assert collate(None)["targets"][0]["labels"].tolist() == [7, 1, 3]


@pytest.mark.parametrize("official_protocol", [False, True], ids=["default_decoding", "official_protocol"])
def test_evaluate_script_evaluates_a_converted_model(converted, coco_set, tmp_path, official_protocol):
    evaluate = load_example("evaluate")
    annotation_file, images_dir = coco_set
    output = tmp_path / "results.json"
    argv = [
        "--model_name_or_path", str(converted), "--coco_annotations", str(annotation_file),
        "--coco_images", str(images_dir), "--output_file", str(output), "--batch_size", "2", "--cpu",
    ]  # fmt: skip
    if official_protocol:
        argv.append("--official_protocol")
    assert evaluate.main(argv) == 0
    report = json.loads(output.read_text())
    assert report["labels"] == "category_ids" and report["num_images"] == 4
    assert set(report["metrics"]) >= {"map", "map_50", "mar_100"}
    assert all(0 <= value <= 1 or value == -1 for value in report["metrics"].values())
    predictions = report["predictions"]
    if not official_protocol:
        # The token grammar makes the random tiny model write objects of its classes. (Under the official protocol
        # its class tokens land beyond the 8 categories, which the official evaluation leaves out.)
        assert predictions
    # Predictions carry the model's labels, which are category ids (not remapped as contiguous labels would be).
    assert {p["image_id"] for p in predictions} <= {10, 11, 12, 13}
    assert {p["category_id"] for p in predictions} <= set(range(8))
