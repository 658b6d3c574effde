"""COCO evaluation: agreement with pycocotools called directly, known values, merging, the evaluate module."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pix2seq_hf.evaluation import METRIC_KEYS, CocoDetectionEvaluator, load_coco_detection_metric


ID2LABEL = {0: "cat", 1: "dog"}
IMAGES = [(1, 100, 120), (2, 80, 80)]  # id, height, width
GROUND_TRUTH = {
    1: {"boxes": [[10, 10, 50, 60], [60, 20, 110, 90]], "labels": [0, 1], "iscrowd": [0, 0]},
    2: {"boxes": [[5, 5, 40, 40], [0, 0, 80, 80]], "labels": [1, 0], "iscrowd": [0, 1]},
}


def _evaluator(predictions):
    evaluator = CocoDetectionEvaluator(ID2LABEL)
    for image_id, height, width in IMAGES:
        truth = GROUND_TRUTH[image_id]
        evaluator.add_ground_truth(image_id, height, width, truth["boxes"], truth["labels"], truth["iscrowd"])
    for image_id, found in predictions.items():
        evaluator.add_predictions(image_id, found["boxes"], found["labels"], found["scores"])
    return evaluator


def _pycocotools_directly(predictions):
    """The same case written by hand in the COCO json format and scored by COCOeval."""
    annotations, annotation_id = [], 1
    for image_id, truth in GROUND_TRUTH.items():
        for (x0, y0, x1, y1), label, crowd in zip(truth["boxes"], truth["labels"], truth["iscrowd"]):
            annotations.append(
                {
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": (x1 - x0) * (y1 - y0),
                    "iscrowd": crowd,
                }
            )
            annotation_id += 1
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": [{"id": i, "height": h, "width": w} for i, h, w in IMAGES],
        "annotations": annotations,
        "categories": [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}],
    }
    results = [
        {"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
        for image_id, found in predictions.items()
        for (x0, y0, x1, y1), label, score in zip(found["boxes"], found["labels"], found["scores"])
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth.createIndex()
        evaluation = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return dict(zip(METRIC_KEYS, evaluation.stats))


PERFECT = {
    1: {"boxes": GROUND_TRUTH[1]["boxes"], "labels": [0, 1], "scores": [0.9, 0.8]},
    2: {"boxes": [[5, 5, 40, 40]], "labels": [1], "scores": [0.7]},
}
MIXED = {
    1: {"boxes": [[12, 8, 52, 61], [0, 0, 30, 30], [60, 20, 110, 90]], "labels": [0, 0, 0], "scores": [0.9, 0.95, 0.4]},
    2: {"boxes": [[6, 4, 41, 39], [10, 10, 70, 70]], "labels": [1, 0], "scores": [0.6, 0.99]},
}


@pytest.mark.parametrize("predictions", [PERFECT, MIXED], ids=["perfect", "mixed"])
def test_agrees_with_pycocotools(predictions):
    ours = _evaluator(predictions).compute()
    reference = _pycocotools_directly(predictions)
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(reference[key], abs=1e-9), key


def test_perfect_predictions_score_one():
    metrics = _evaluator(PERFECT).compute()
    assert metrics["map"] == pytest.approx(1.0)
    assert metrics["map_50"] == pytest.approx(1.0) and metrics["mar_100"] == pytest.approx(1.0)


def test_known_miss():
    """Two non-crowd ground-truth objects of one class per image set, one found: recall 0.5, AP 0.5."""
    predictions = {1: {"boxes": [[10, 10, 50, 60]], "labels": [0], "scores": [0.9]}}
    evaluator = CocoDetectionEvaluator({0: "cat"})
    evaluator.add_ground_truth(1, 100, 120, [[10, 10, 50, 60], [60, 20, 110, 90]], [0, 0])
    evaluator.add_predictions(1, predictions[1]["boxes"], predictions[1]["labels"], predictions[1]["scores"])
    metrics = evaluator.compute()
    assert metrics["mar_100"] == pytest.approx(0.5)
    # 101-point interpolated precision: 1.0 up to recall 0.5, then 0 -> 51/101.
    assert metrics["map"] == pytest.approx(51 / 101)


def test_crowd_regions_are_ignored():
    """A prediction on the crowd box of image 2 is neither a true nor a false positive."""
    with_crowd_hit = {**PERFECT, 2: {"boxes": [[5, 5, 40, 40], [0, 0, 80, 80]], "labels": [1, 0], "scores": [0.7, 0.99]}}
    assert _evaluator(with_crowd_hit).compute()["map"] == pytest.approx(1.0)


def test_no_predictions_and_bad_input():
    metrics = _evaluator({}).compute()
    assert metrics["map"] == 0.0 and metrics["mar_100"] == 0.0
    evaluator = _evaluator({})
    with pytest.raises(ValueError, match="image 7"):
        evaluator.add_predictions(7, [[0, 0, 1, 1]], [0], [0.5])
    with pytest.raises(ValueError, match="Image 1: predicted box 0 has a non-finite"):
        evaluator.add_predictions(1, [[0, np.nan, 1, 1]], [0], [0.5])
    with pytest.raises(ValueError, match=r"labels \[5\]"):
        CocoDetectionEvaluator(ID2LABEL).add_ground_truth(3, 10, 10, [[0, 0, 5, 5]], [5])


def test_merging_shards_equals_one_evaluator():
    whole = _evaluator(MIXED).compute()
    first, second = CocoDetectionEvaluator(ID2LABEL), CocoDetectionEvaluator(ID2LABEL)
    for shard, (image_id, height, width) in zip((first, second), IMAGES):
        truth = GROUND_TRUTH[image_id]
        shard.add_ground_truth(image_id, height, width, truth["boxes"], truth["labels"], truth["iscrowd"])
        shard.add_predictions(image_id, MIXED[image_id]["boxes"], MIXED[image_id]["labels"], MIXED[image_id]["scores"])
    merged = CocoDetectionEvaluator(ID2LABEL)
    for state in (first.state_dict(), second.state_dict(), first.state_dict()):  # a repeated shard counts once
        merged.load_state_dict(state)
    assert merged.compute() == pytest.approx(whole)


def test_evaluate_metric_module_from_local_path():
    metric = load_coco_detection_metric()
    predictions = [{"image_id": i, **MIXED[i]} for i, _, _ in IMAGES]
    references = [{"image_id": i, "height": h, "width": w, **GROUND_TRUTH[i]} for i, h, w in IMAGES]
    result = metric.compute(predictions=predictions, references=references, id2label=ID2LABEL)
    reference = _pycocotools_directly(MIXED)
    for key in METRIC_KEYS:
        assert result[key] == pytest.approx(reference[key], abs=1e-9), key
