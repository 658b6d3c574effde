"""COCO evaluation: agreement with pycocotools called directly, known values, crowd regions, bad input, merging and
gathering across processes, the `evaluate` module, and `evaluate_model` with stand-ins and with a real tiny model."""

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pix2seq_hf.evaluation import (
    KEEP_ALL_THRESHOLD,
    METRIC_KEYS,
    CocoDetectionEvaluator,
    coco_detection_metric_path,
    evaluate_model,
    load_coco_detection_metric,
)


ID2LABEL = {0: "cat", 1: "dog"}
IMAGES = [(1, 100, 120), (2, 80, 80), (3, 60, 60)]  # id, height, width; image 3 has no object
GROUND_TRUTH = {
    1: {"boxes": [[10, 10, 50, 60], [60, 20, 110, 90]], "labels": [0, 1], "iscrowd": [0, 0]},
    2: {"boxes": [[5, 5, 40, 40], [0, 0, 80, 80]], "labels": [1, 0], "iscrowd": [0, 1]},
    3: {"boxes": [], "labels": [], "iscrowd": []},
}
PERFECT = {
    1: {"boxes": GROUND_TRUTH[1]["boxes"], "labels": [0, 1], "scores": [0.9, 0.8]},
    2: {"boxes": [[5, 5, 40, 40]], "labels": [1], "scores": [0.7]},
}
MIXED = {
    1: {
        "boxes": [[12, 8, 52, 61], [0, 0, 30, 30], [60, 20, 110, 90]],
        "labels": [0, 0, 0],
        "scores": [0.9, 0.95, 0.4],
    },
    2: {"boxes": [[6, 4, 41, 39], [10, 10, 70, 70]], "labels": [1, 0], "scores": [0.6, 0.99]},
    3: {"boxes": [[1, 1, 20, 20], [30, 30, 50, 55]], "labels": [1, 0], "scores": [0.85, 0.3]},  # no object there
}


def _evaluator(predictions, ground_truth=GROUND_TRUTH, images=IMAGES, **kwargs):
    evaluator = CocoDetectionEvaluator(ID2LABEL, **kwargs)
    for image_id, height, width in images:
        truth = ground_truth[image_id]
        evaluator.add_ground_truth(
            image_id, height, width, truth["boxes"], truth["labels"], truth["iscrowd"], truth.get("area")
        )
    for image_id, found in predictions.items():
        evaluator.add_predictions(image_id, found["boxes"], found["labels"], found["scores"])
    return evaluator


def _pycocotools_directly(predictions, ground_truth=GROUND_TRUTH, images=IMAGES, category_ids=None):
    """The same case written by hand in the COCO json format and scored by COCOeval (optionally for some classes)."""
    annotations, annotation_id = [], 1
    for image_id, _, _ in images:
        truth = ground_truth[image_id]
        areas = truth.get("area") or [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in truth["boxes"]]
        for (x0, y0, x1, y1), label, crowd, area in zip(truth["boxes"], truth["labels"], truth["iscrowd"], areas):
            annotations.append(
                {
                    "id": annotation_id,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": area,
                    "iscrowd": crowd,
                }
            )
            annotation_id += 1
    ground_truth_api = COCO()
    ground_truth_api.dataset = {
        "images": [{"id": i, "height": h, "width": w} for i, h, w in images],
        "annotations": annotations,
        "categories": [{"id": 0, "name": "cat"}, {"id": 1, "name": "dog"}],
    }
    results = [
        {"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
        for image_id, found in predictions.items()
        for (x0, y0, x1, y1), label, score in zip(found["boxes"], found["labels"], found["scores"])
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        ground_truth_api.createIndex()
        evaluation = COCOeval(ground_truth_api, ground_truth_api.loadRes(results), iouType="bbox")
        if category_ids is not None:
            evaluation.params.catIds = category_ids
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return dict(zip(METRIC_KEYS, evaluation.stats))


def _assert_metrics_equal(ours, reference):
    for key in METRIC_KEYS:
        assert ours[key] == pytest.approx(reference[key], abs=1e-12), key


# ----- agreement with pycocotools and known values -------------------------------------------------------------------


WITH_AREAS = {
    **GROUND_TRUTH,
    # COCO's areas are segment areas: a 35x35 box holding a small object (area 900 < 32^2) and a large crowd region.
    2: {**GROUND_TRUTH[2], "area": [900.0, 5000.0]},
}


@pytest.mark.parametrize(
    "predictions, ground_truth",
    [(PERFECT, GROUND_TRUTH), (MIXED, GROUND_TRUTH), (MIXED, WITH_AREAS)],
    ids=["perfect", "mixed", "segment-areas"],
)
def test_agrees_with_pycocotools(predictions, ground_truth):
    evaluator = _evaluator(predictions, ground_truth)
    ours = evaluator.compute(per_class=True)
    _assert_metrics_equal(ours, _pycocotools_directly(predictions, ground_truth))
    for label, name in ID2LABEL.items():
        alone = _pycocotools_directly(predictions, ground_truth, category_ids=[label])
        assert ours["map_per_class"][name] == pytest.approx(alone["map"], abs=1e-12)
        assert ours["mar_100_per_class"][name] == pytest.approx(alone["mar_100"], abs=1e-12)


def test_segment_areas_decide_the_size_ranges():
    by_box = _evaluator(PERFECT).compute()
    by_segment = _evaluator(PERFECT, WITH_AREAS).compute()
    # The dog of image 2 (a 35x35 box) is medium by its box and small by its segment area.
    assert by_box["map_small"] == -1.0 and by_segment["map_small"] == pytest.approx(1.0)
    assert by_box["map"] == pytest.approx(by_segment["map"])


def test_perfect_predictions_score_one():
    metrics = _evaluator(PERFECT).compute()
    for key in ("map", "map_50", "map_75", "map_medium", "mar_1", "mar_10", "mar_100"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["map_small"] == -1.0 and metrics["map_large"] == -1.0  # no small or large object


def test_known_miss():
    """Two objects of one class, one found exactly: recall 0.5; the 101-point interpolated precision is 1.0 for
    recall 0.00..0.50 (51 points) and 0 above, so AP = 51/101 at every IoU threshold."""
    evaluator = CocoDetectionEvaluator({0: "cat"})
    evaluator.add_ground_truth(1, 100, 120, [[10, 10, 50, 60], [60, 20, 110, 90]], [0, 0])
    evaluator.add_predictions(1, [[10, 10, 50, 60]], [0], [0.9])
    metrics = evaluator.compute()
    assert metrics["mar_100"] == pytest.approx(0.5) and metrics["mar_1"] == pytest.approx(0.5)
    assert metrics["map"] == pytest.approx(51 / 101) and metrics["map_50"] == pytest.approx(51 / 101)


def test_false_positive_ranked_first_lowers_precision():
    """One object, a wrong detection scored above the right one: precision 0.5 at every recall -> AP 0.5."""
    evaluator = CocoDetectionEvaluator({0: "cat"})
    evaluator.add_ground_truth(1, 100, 100, [[10, 10, 50, 50]], [0])
    evaluator.add_predictions(1, [[60, 60, 90, 90], [10, 10, 50, 50]], [0, 0], [0.9, 0.8])
    metrics = evaluator.compute()
    assert metrics["map"] == pytest.approx(0.5) and metrics["mar_100"] == pytest.approx(1.0)
    assert metrics["mar_1"] == 0.0  # the best-scored detection alone finds nothing


def test_crowd_regions_are_ignored():
    """A detection inside a crowd region is neither a true nor a false positive; an unfound crowd region is no miss."""
    inside = {"boxes": [[5, 5, 40, 40], [45, 45, 70, 70]], "labels": [1, 0], "scores": [0.7, 0.99]}
    inside_crowd = {**PERFECT, 2: inside}
    with_crowd = _evaluator(inside_crowd).compute()
    assert with_crowd["map"] == pytest.approx(1.0) and with_crowd["mar_100"] == pytest.approx(1.0)
    # The same region as an ordinary object: the detection is a false positive and the object a miss.
    not_crowd = {**GROUND_TRUTH, 2: {**GROUND_TRUTH[2], "iscrowd": [0, 0]}}
    ordinary = _evaluator(inside_crowd, not_crowd).compute()
    assert ordinary["map"] < 0.8 and ordinary["mar_100"] == pytest.approx(0.75)  # cat recall 1/2, dog 2/2
    _assert_metrics_equal(ordinary, _pycocotools_directly(inside_crowd, not_crowd))


def test_no_predictions_and_no_ground_truth():
    metrics = _evaluator({}).compute()
    assert metrics["map"] == 0.0 and metrics["map_50"] == 0.0 and metrics["mar_100"] == 0.0
    assert metrics["map_small"] == -1.0  # no small object: nothing to measure
    empty = {1: {"boxes": [], "labels": [], "iscrowd": []}}
    false_positives_only = {1: {"boxes": [[0, 0, 5, 5]], "labels": [0], "scores": [0.5]}}
    assert set(_evaluator(false_positives_only, empty, [(1, 9, 9)]).compute().values()) == {-1.0}
    with pytest.raises(ValueError, match="no image was added"):
        CocoDetectionEvaluator(ID2LABEL).compute()


def test_quiet_unless_verbose(capsys):
    evaluator = _evaluator(MIXED)
    evaluator.compute()
    assert capsys.readouterr().out == ""
    evaluator.compute(verbose=True)
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in capsys.readouterr().out


# ----- input ---------------------------------------------------------------------------------------------------------


def test_inputs_as_tensors_and_arrays():
    as_lists = _evaluator(MIXED).compute()
    evaluator = CocoDetectionEvaluator(ID2LABEL)
    for image_id, height, width in IMAGES:
        truth = GROUND_TRUTH[image_id]
        evaluator.add_ground_truth(
            torch.tensor([image_id]),
            torch.tensor(height),
            np.int64(width),
            torch.tensor(truth["boxes"], dtype=torch.float32).reshape(-1, 4),
            torch.tensor(truth["labels"], dtype=torch.int64),
            np.array(truth["iscrowd"], dtype=np.int8),
        )
        found = MIXED[image_id]
        evaluator.add_predictions(
            np.int64(image_id), np.array(found["boxes"]), np.array(found["labels"]), torch.tensor(found["scores"])
        )
    assert evaluator.compute() == pytest.approx(as_lists, abs=1e-6)


def test_bad_input_is_refused_with_the_image_named():
    evaluator = _evaluator({})
    with pytest.raises(ValueError, match="image 7, which has no ground truth"):
        evaluator.add_predictions(7, [[0, 0, 1, 1]], [0], [0.5])
    with pytest.raises(ValueError, match=r"Image 1: predicted box 1 has a non-finite coordinate"):
        evaluator.add_predictions(1, [[0, 0, 1, 1], [0, np.nan, 1, 1]], [0, 0], [0.5, 0.4])
    with pytest.raises(ValueError, match=r"Image 2: score 0 is not finite"):
        evaluator.add_predictions(2, [[0, 0, 1, 1]], [0], [float("inf")])
    with pytest.raises(ValueError, match=r"Image 2: predicted box 0 is not \(x_min, y_min, x_max, y_max\)"):
        evaluator.add_predictions(2, [[10, 0, 1, 1]], [0], [0.5])
    with pytest.raises(ValueError, match=r"shape \[n, 4\]"):
        evaluator.add_predictions(2, [[0, 0, 1, 1, 1]], [0], [0.5])
    with pytest.raises(ValueError, match=r"predicted labels \[5\] are not among the classes \[0, 1\]"):
        evaluator.add_predictions(2, [[0, 0, 1, 1]], [5], [0.5])
    with pytest.raises(ValueError, match="1 boxes, 2 labels and 1 scores"):
        evaluator.add_predictions(2, [[0, 0, 1, 1]], [0, 1], [0.5])
    with pytest.raises(ValueError, match="Image 1 was added twice"):
        evaluator.add_ground_truth(1, 100, 120, [], [])
    with pytest.raises(ValueError, match=r"Image 4: ground-truth labels \[5\]"):
        evaluator.add_ground_truth(4, 10, 10, [[0, 0, 5, 5]], [5])
    with pytest.raises(ValueError, match="Image 4: iscrowd must be 0 or 1"):
        evaluator.add_ground_truth(4, 10, 10, [[0, 0, 5, 5]], [0], iscrowd=[2])
    with pytest.raises(ValueError, match="Image 4: ground-truth labels must be integers"):
        evaluator.add_ground_truth(4, 10, 10, [[0, 0, 5, 5]], [0.5])
    with pytest.raises(ValueError, match="Image 4: size must be positive"):
        evaluator.add_ground_truth(4, 0, 10, [], [])
    with pytest.raises(ValueError, match="An image id must be an integer, got 'a'"):
        evaluator.add_ground_truth("a", 10, 10, [], [])
    assert len(evaluator) == 3  # nothing half-added by the refused calls
    with pytest.raises(ValueError, match="`categories` is empty"):
        CocoDetectionEvaluator({})
    with pytest.raises(ValueError, match="Category id 3 is given twice"):
        CocoDetectionEvaluator([{"id": 3, "name": "a"}, {"id": 3, "name": "b"}])
    twins = CocoDetectionEvaluator({0: "x", 1: "x"})
    twins.add_ground_truth(1, 10, 10, [[0, 0, 5, 5]], [0])
    assert twins.compute()["map"] == 0.0  # names only matter for the per-class results
    with pytest.raises(ValueError, match=r"the names \['x'\] repeat"):
        twins.compute(per_class=True)


def test_coco_categories_and_results_in_the_data_ids():
    """COCO categories with the data's own ids, and contiguous labels mapped back to those ids for the results."""
    by_categories = CocoDetectionEvaluator([{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}])
    by_categories.add_ground_truth(5, 50, 50, [[0, 0, 20, 20], [20, 20, 40, 45]], [1, 18])
    by_categories.add_predictions(5, [[0, 0, 20, 20]], [18], [0.9])
    contiguous = CocoDetectionEvaluator({0: "person", 1: "dog"}, label2category_id={0: 1, 1: 18})
    contiguous.add_ground_truth(5, 50, 50, [[0, 0, 20, 20], [20, 20, 40, 45]], [0, 1])
    contiguous.add_predictions(5, [[0, 0, 20, 20]], [1], [0.9])
    assert by_categories.compute() == contiguous.compute()
    assert contiguous.to_coco_results() == [{"image_id": 5, "category_id": 18, "bbox": [0, 0, 20, 20], "score": 0.9}]
    assert contiguous.to_coco_results() == by_categories.to_coco_results()


# ----- state across processes ----------------------------------------------------------------------------------------


def _shards(predictions, shard_images):
    shards = []
    for images in shard_images:
        shard = CocoDetectionEvaluator(ID2LABEL, label2category_id={0: 10, 1: 20})
        for image_id, height, width in images:
            truth = GROUND_TRUTH[image_id]
            shard.add_ground_truth(image_id, height, width, truth["boxes"], truth["labels"], truth["iscrowd"])
            if image_id in predictions:
                found = predictions[image_id]
                shard.add_predictions(image_id, found["boxes"], found["labels"], found["scores"])
        shards.append(shard)
    return shards


def test_merging_shards_equals_one_evaluator():
    whole = _evaluator(MIXED).compute()
    # A distributed sampler pads the last shard with the first image again.
    first, second = _shards(MIXED, [IMAGES[:2], [IMAGES[2], IMAGES[0]]])
    merged = CocoDetectionEvaluator.from_state(first.state_dict())
    merged.merge(second)
    assert len(merged) == 3 and len(merged.predictions) == 7
    assert merged.compute() == whole
    # The state is JSON: it survives a file, and the label -> category id map comes back with int keys.
    restored = CocoDetectionEvaluator.from_state(json.loads(json.dumps(merged.state_dict())))
    assert restored.compute() == whole and restored.to_coco_results() == merged.to_coco_results()


def test_merging_refuses_other_classes_and_clashing_images():
    first, second = _shards(MIXED, [IMAGES[:1], IMAGES[:1]])
    with pytest.raises(ValueError, match="different classes"):
        CocoDetectionEvaluator({0: "cat"}).merge(first)
    state = second.state_dict()
    state["images"][0]["height"] = 99
    with pytest.raises(ValueError, match="two different images share this id"):
        first.merge(state)


def test_gather_joins_every_process(monkeypatch):
    import accelerate.utils

    whole = _evaluator(MIXED).compute()
    first, second = _shards(MIXED, [IMAGES[:2], IMAGES[2:]])
    assert first.gather(None) is first and first.gather(SimpleNamespace(num_processes=1)) is first
    # Process 0's view of `gather_object`: its own list joined with process 1's.
    monkeypatch.setattr(accelerate.utils, "gather_object", lambda objects: objects + [second.state_dict()])
    gathered = first.gather(SimpleNamespace(num_processes=2))
    assert gathered is not first and len(first) == 2
    assert gathered.compute() == whole and gathered.label2category_id == {0: 10, 1: 20}


# ----- the evaluate module -------------------------------------------------------------------------------------------


def test_evaluate_metric_module_from_local_path():
    metric = load_coco_detection_metric()
    assert Path(coco_detection_metric_path()).is_file()
    predictions = [{"image_id": i, **MIXED[i]} for i, _, _ in IMAGES]
    references = [{"image_id": i, "height": h, "width": w, **WITH_AREAS[i]} for i, h, w in IMAGES]
    result = metric.compute(predictions=predictions, references=references, categories=ID2LABEL, per_class=True)
    ours = _evaluator(MIXED, WITH_AREAS).compute(per_class=True)
    _assert_metrics_equal(result, _pycocotools_directly(MIXED, WITH_AREAS))
    assert result["map_per_class"] == pytest.approx(ours["map_per_class"])
    # Batch by batch, in another order, with optional columns left out (no crowd, box areas) and arrays as input.
    plain = {i: {**truth, "iscrowd": [0] * len(truth["labels"])} for i, truth in GROUND_TRUTH.items()}
    for image_id, height, width in reversed(IMAGES):
        truth = GROUND_TRUTH[image_id]
        metric.add_batch(
            predictions=[{"image_id": image_id, **{k: np.array(v) for k, v in MIXED[image_id].items()}}],
            references=[
                {
                    "image_id": image_id,
                    "height": height,
                    "width": width,
                    "boxes": truth["boxes"],
                    "labels": truth["labels"],
                }
            ],
        )
    _assert_metrics_equal(metric.compute(categories=ID2LABEL), _pycocotools_directly(MIXED, plain))
    with pytest.raises(ValueError, match="image 9, which has no ground truth"):
        metric.compute(
            predictions=[{"image_id": 9, "boxes": [], "labels": [], "scores": []}],
            references=[{"image_id": 1, "height": 5, "width": 5, "boxes": [[0, 0, 1, 1]], "labels": [0]}],
        )


# ----- evaluate_model with stand-ins ---------------------------------------------------------------------------


class StandInModel(torch.nn.Module):
    """Writes each image's id (pixel [0, 0, 0]) as its "sequence"; records the generate calls."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(id2label=ID2LABEL)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.calls = []

    def generate(self, pixel_values, **kwargs):
        self.calls.append({"training": self.training, "device": pixel_values.device, **kwargs})
        return SimpleNamespace(sequences=pixel_values[:, 0, 0, 0].long(), logits=())


class StandInProcessor:
    """Returns the detections of `MIXED` for the image ids in the "sequences"; records its arguments."""

    def __init__(self):
        self.calls = []

    def post_process_object_detection(self, outputs, threshold, target_sizes):
        self.calls.append({"threshold": threshold, "target_sizes": target_sizes})
        empty = {"boxes": [], "labels": [], "scores": []}
        results = []
        for image_id in outputs.sequences.tolist():
            found = MIXED.get(image_id, empty)
            results.append(
                {
                    "boxes": torch.tensor(found["boxes"], dtype=torch.float32).reshape(-1, 4),
                    "labels": torch.tensor(found["labels"], dtype=torch.long),
                    "scores": torch.tensor(found["scores"], dtype=torch.float32),
                }
            )
        return results


def _batches(order):
    """Evaluation batches as `Pix2SeqCollator(processor, training=False)` makes them."""
    batches = []
    sizes = {image_id: (height, width) for image_id, height, width in IMAGES}
    for ids in order:
        pixel_values = torch.zeros(len(ids), 3, 4, 4)
        pixel_values[:, 0, 0, 0] = torch.tensor(ids, dtype=torch.float32)
        targets = [
            {
                "image_id": torch.tensor([i]),
                "orig_size": torch.tensor(sizes[i]),
                "boxes": torch.tensor(GROUND_TRUTH[i]["boxes"], dtype=torch.float32).reshape(-1, 4),
                "labels": torch.tensor(GROUND_TRUTH[i]["labels"], dtype=torch.long),
                "iscrowd": torch.tensor(GROUND_TRUTH[i]["iscrowd"], dtype=torch.long),
            }
            for i in ids
        ]
        for target in targets:
            if "area" in WITH_AREAS[int(target["image_id"])]:
                target["area"] = torch.tensor(WITH_AREAS[int(target["image_id"])]["area"])
        batches.append({"pixel_values": pixel_values, "targets": targets})
    return batches


def test_evaluate_model_scores_what_the_processor_returns():
    model, processor = StandInModel(), StandInProcessor()
    model.train()
    # The last batch repeats image 1, as a distributed sampler pads its shards: it is evaluated once.
    metrics, predictions = evaluate_model(
        model,
        processor,
        _batches([[1, 2], [3, 1]]),
        generation_kwargs={"do_sample": False},
        label2category_id={0: 10, 1: 20},
        return_predictions=True,
        per_class=True,
    )
    assert metrics == _evaluator(MIXED, WITH_AREAS).compute(per_class=True)
    assert len(predictions) == 7 and {p["category_id"] for p in predictions} == {10, 20}
    assert model.training  # put back as it was
    assert all(call["training"] is False for call in model.calls)
    assert model.calls[0]["do_sample"] is False
    assert all(call["return_dict_in_generate"] and call["output_logits"] for call in model.calls)
    assert [call["target_sizes"] for call in processor.calls] == [[(100, 120), (80, 80)], [(60, 60), (100, 120)]]
    assert all(call["threshold"] == KEEP_ALL_THRESHOLD < 0 for call in processor.calls)


# image_id, height, width, COCO xywh boxes, labels, iscrowd, areas (the dog of image 10 is small by its box, 25x30,
# and medium by its area; image 12 holds a crowd region)
NON_SQUARE = [
    (10, 48, 80, [[4, 6, 30, 20], [50, 10, 25, 30]], [0, 1], [0, 0], [500.0, 1100.0]),
    (11, 80, 48, [[10, 40, 30, 35]], [1], [0], [1000.0]),
    (12, 64, 64, [[0, 0, 64, 64], [8, 8, 16, 16]], [0, 1], [1, 0], [3000.0, 200.0]),
]


class ReplayProcessor:
    """A perfect detector: collates with a real processor and "detects" the annotated non-crowd objects of
    `NON_SQUARE` in order, scaling x by the width and y by the height it is given for each image."""

    def __init__(self):
        from helpers import TINY_LAYOUT
        from pix2seq_hf.image_processing_pix2seq import Pix2SeqImageProcessor
        from pix2seq_hf.processing_pix2seq import Pix2SeqProcessor

        self.processor = Pix2SeqProcessor(Pix2SeqImageProcessor(size=64), **TINY_LAYOUT)
        self.queue = []
        for _, height, width, boxes, labels, crowd, _ in NON_SQUARE:
            real = [i for i, flag in enumerate(crowd) if not flag]
            relative = [[x / width, y / height, (x + w) / width, (y + h) / height] for x, y, w, h in boxes]
            self.queue.append(
                {
                    "boxes": torch.tensor([relative[i] for i in real]),
                    "labels": torch.tensor([labels[i] for i in real]),
                    "scores": torch.linspace(0.9, 0.5, len(real)),
                }
            )

    def __call__(self, *args, **kwargs):
        return self.processor(*args, **kwargs)

    def post_process_object_detection(self, outputs, threshold, target_sizes):
        found, self.queue = self.queue[: len(target_sizes)], self.queue[len(target_sizes) :]
        scale = [torch.tensor([w, h, w, h], dtype=torch.float32) for h, w in target_sizes]
        return [{**f, "boxes": f["boxes"] * s} for f, s in zip(found, scale)]


def test_evaluate_model_collates_a_dataset_and_keeps_its_ground_truth():
    """A dataset of non-square images goes through `Pix2SeqCollator`; a perfect detector then scores 1.0 in every
    measurable metric: the targets kept the image sizes as (height, width), the boxes, labels, crowd flags and
    areas."""
    import datasets
    from PIL import Image

    from pix2seq_hf.data.schema import detection_features

    columns = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    for image_id, height, width, boxes, labels, crowd, areas in NON_SQUARE:
        columns["image"].append(Image.new("RGB", (width, height), (image_id, 90, 30)))
        columns["image_id"].append(image_id)
        columns["width"].append(width)
        columns["height"].append(height)
        objects = {"id": list(range(len(boxes))), "area": areas, "bbox": boxes, "category": labels, "iscrowd": crowd}
        columns["objects"].append(objects)
    dataset = datasets.Dataset.from_dict(columns, features=detection_features(["cat", "dog"]))
    metrics = evaluate_model(StandInModel(), ReplayProcessor(), dataset, batch_size=2)
    for key in ("map", "map_50", "map_75", "map_small", "map_medium", "mar_1", "mar_10", "mar_100"):
        assert metrics[key] == pytest.approx(1.0), key
    assert metrics["map_large"] == -1.0  # the only large region is a crowd region


def test_evaluate_model_refuses_malformed_batches_and_options():
    model, processor = StandInModel(), StandInProcessor()
    model.train()
    with pytest.raises(ValueError, match="must be a dict with `pixel_values` and `targets`"):
        evaluate_model(model, processor, [{"pixel_values": torch.zeros(1, 3, 4, 4)}])
    batch = _batches([[1, 2]])[0]
    with pytest.raises(ValueError, match="has 2 images but 1 targets"):
        evaluate_model(model, processor, [{**batch, "targets": batch["targets"][:1]}])
    del batch["targets"][0]["orig_size"]
    with pytest.raises(ValueError, match=r"lacks \['orig_size'\]"):
        evaluate_model(model, processor, [batch])
    with pytest.raises(ValueError, match="needs `output_logits=True`"):
        evaluate_model(model, processor, _batches([[1]]), generation_kwargs={"output_logits": False})
    assert model.training  # runs that failed put the mode back too


# ----- evaluate_model with a real tiny model -------------------------------------------------------------------------


GREEDY_FULL = {"do_sample": False, "suppress_eos": True}  # deterministic, and every image gets max_objects objects


def _tiny_setup():
    from helpers import tiny_config
    from pix2seq_hf.data.synthetic import make_synthetic_detection_dataset
    from pix2seq_hf.image_processing_pix2seq import Pix2SeqImageProcessor
    from pix2seq_hf.modeling_pix2seq import Pix2SeqForObjectDetection
    from pix2seq_hf.processing_pix2seq import Pix2SeqProcessor

    torch.manual_seed(0)
    config = tiny_config(layers=1, id2label={i: f"shape{i}" for i in range(5)})
    model = Pix2SeqForObjectDetection(config)
    processor = Pix2SeqProcessor.from_config(config, image_processor=Pix2SeqImageProcessor(size=64))
    dataset = make_synthetic_detection_dataset(5, seed=1, image_size=64, max_objects=4, split="validation")
    return model, processor, dataset


def test_evaluate_model_end_to_end_with_a_tiny_model():
    from pix2seq_hf.data.collator import Pix2SeqCollator

    model, processor, dataset = _tiny_setup()
    metrics, predictions = evaluate_model(
        model, processor, dataset, batch_size=2, generation_kwargs=GREEDY_FULL, return_predictions=True
    )
    assert set(metrics) == set(METRIC_KEYS) and all(-1.0 <= v <= 1.0 for v in metrics.values())
    assert len(predictions) == len(dataset) * model.config.max_objects
    for p in predictions:
        x, y, w, h = p["bbox"]
        assert 0 <= x <= x + w <= 64 and 0 <= y <= y + h <= 64 and 0 <= p["score"] <= 1
    # The ground truth reached the evaluator intact: scoring the returned predictions against the dataset's own
    # annotations (COCO xywh, segment areas) gives the same numbers.
    direct = CocoDetectionEvaluator(model.config.id2label)
    for example in dataset:
        objects = example["objects"]
        boxes = [[x, y, x + w, y + h] for x, y, w, h in objects["bbox"]]
        direct.add_ground_truth(
            example["image_id"], example["height"], example["width"], boxes, objects["category"],
            objects["iscrowd"], objects["area"],
        )  # fmt: skip
    for p in predictions:
        x, y, w, h = p["bbox"]
        direct.add_predictions(p["image_id"], [[x, y, x + w, y + h]], [p["category_id"]], [p["score"]])
    assert direct.compute() == pytest.approx(metrics, abs=1e-6)
    # A DataLoader of collated batches gives the same result as the dataset.
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=2, collate_fn=Pix2SeqCollator(processor, training=False, return_sequences=False)
    )
    assert evaluate_model(model, processor, loader, generation_kwargs=GREEDY_FULL) == metrics


_TWO_PROCESS_SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
import torch
from accelerate import Accelerator
from test_evaluation import GREEDY_FULL, _tiny_setup
from pix2seq_hf.evaluation import evaluate_model

accelerator = Accelerator(cpu=True)
model, processor, dataset = _tiny_setup()
generated = []  # images this process decodes itself
generate = model.generate
model.generate = lambda pixel_values, **kwargs: generated.append(len(pixel_values)) or generate(pixel_values, **kwargs)
metrics, predictions = evaluate_model(
    model, processor, dataset, batch_size=2, generation_kwargs=GREEDY_FULL, accelerator=accelerator,
    return_predictions=True,
)
with open({out!r} + f"/rank{{accelerator.process_index}}.json", "w") as handle:
    json.dump(
        {{
            "world": accelerator.num_processes,
            "generated": sum(generated),
            "metrics": metrics,
            "predictions": predictions,
        }},
        handle,
    )
"""


def test_two_processes_evaluate_shards_and_agree_with_one(tmp_path):
    """Two CPU processes joined over gloo each evaluate half of the images (the 5th image pads one shard); every
    process ends with the metrics and predictions of a single-process run."""
    tests = str(Path(__file__).resolve().parent)
    script = tmp_path / "two.py"
    script.write_text(textwrap.dedent(_TWO_PROCESS_SCRIPT.format(tests=tests, out=str(tmp_path))))
    from helpers import free_port

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    processes = [
        subprocess.Popen(
            [sys.executable, str(script)],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], "\n".join(log[-2000:] for log in logs)

    model, processor, dataset = _tiny_setup()
    metrics, predictions = evaluate_model(
        model, processor, dataset, batch_size=2, generation_kwargs=GREEDY_FULL, return_predictions=True
    )
    def key(prediction):  # per image, best first (scores rounded: other batch compositions, other last bits)
        return prediction["image_id"], -round(prediction["score"], 4), [round(v, 1) for v in prediction["bbox"]]

    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["world"] == 2 and 0 < result["generated"] < len(dataset)  # a shard, not the whole set
        assert result["metrics"] == pytest.approx(metrics, abs=1e-6)
        assert len(result["predictions"]) == len(predictions)
        for theirs, ours in zip(sorted(result["predictions"], key=key), sorted(predictions, key=key)):
            assert theirs["image_id"] == ours["image_id"] and theirs["category_id"] == ours["category_id"]
            assert theirs["bbox"] == pytest.approx(ours["bbox"], abs=1e-4)
