"""COCO detection metrics through pycocotools, and batched evaluation of a Pix2Seq model on a dataloader."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


# The order of COCOeval.stats for bounding boxes.
METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


def _as_float_boxes(boxes, image_id, what: str) -> np.ndarray:
    boxes = np.asarray(torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4).cpu())
    if not np.isfinite(boxes).all():
        bad = int(np.nonzero(~np.isfinite(boxes).all(axis=1))[0][0])
        raise ValueError(f"Image {image_id}: {what} box {bad} has a non-finite coordinate: {boxes[bad].tolist()}.")
    return boxes


def _as_list(values, dtype) -> list:
    return torch.as_tensor(values, dtype=dtype).reshape(-1).cpu().tolist()


class CocoDetectionEvaluator:
    """
    Accumulates ground truth and predictions image by image and computes the COCO box metrics with pycocotools
    `COCOeval`, keeping every prediction (no score threshold, as the paper evaluates).

    Args:
        id2label (`dict[int, str]`): the model's labels; every label is a COCO category.
        label2category_id (`dict[int, int]`, *optional*): the data's category id of each label (COCO's ids are not
            contiguous); only used to report results in the data's ids (`to_coco_results`).

    Boxes are absolute `xyxy` pixels of the original image. State is plain Python lists, so that
    `accelerate.utils.gather_object` can carry it across processes (`state_dict` / `load_state_dict` / `merge`).
    """

    def __init__(self, id2label: Mapping[int, str], label2category_id: Mapping[int, int] | None = None):
        self.id2label = {int(k): str(v) for k, v in id2label.items()}
        self.label2category_id = {int(k): int(v) for k, v in (label2category_id or {}).items()}
        self.images: dict[int, dict] = {}
        self.ground_truth: list[dict] = []
        self.predictions: list[dict] = []

    def add_ground_truth(self, image_id, height, width, boxes, labels, iscrowd=None) -> None:
        """Adds one image and its objects (`boxes` `[n, 4]` xyxy pixels, `labels` `[n]`, `iscrowd` `[n]` 0/1)."""
        image_id = int(image_id)
        if image_id in self.images:
            raise ValueError(f"Image {image_id} was added twice.")
        boxes = _as_float_boxes(boxes, image_id, "ground-truth")
        labels = _as_list(labels, torch.long)
        crowd = _as_list(iscrowd, torch.long) if iscrowd is not None else [0] * len(labels)
        if not len(boxes) == len(labels) == len(crowd):
            raise ValueError(f"Image {image_id}: {len(boxes)} boxes, {len(labels)} labels, {len(crowd)} crowd flags.")
        unknown = sorted({label for label in labels if label not in self.id2label})
        if unknown:
            raise ValueError(f"Image {image_id}: labels {unknown} are not in id2label {sorted(self.id2label)}.")
        self.images[image_id] = {"id": image_id, "height": int(height), "width": int(width)}
        for (x0, y0, x1, y1), label, flag in zip(boxes.tolist(), labels, crowd):
            width_, height_ = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
            self.ground_truth.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, width_, height_],
                    "area": width_ * height_,
                    "iscrowd": int(flag),
                }
            )

    def add_predictions(self, image_id, boxes, labels, scores) -> None:
        """Adds the predictions of an image added with `add_ground_truth` (xyxy pixels)."""
        image_id = int(image_id)
        if image_id not in self.images:
            raise ValueError(f"Predictions for image {image_id}, which has no ground truth (add it first).")
        boxes = _as_float_boxes(boxes, image_id, "predicted")
        labels = _as_list(labels, torch.long)
        scores = _as_list(scores, torch.float64)
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(f"Image {image_id}: {len(boxes)} boxes, {len(labels)} labels, {len(scores)} scores.")
        for (x0, y0, x1, y1), label, score in zip(boxes.tolist(), labels, scores):
            self.predictions.append(
                {"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            )

    def state_dict(self) -> dict:
        return {"images": list(self.images.values()), "ground_truth": self.ground_truth, "predictions": self.predictions}

    def load_state_dict(self, state: Mapping) -> None:
        """Adds the images, ground truth and predictions of another evaluator's `state_dict` (images seen twice, as
        from the padding of a distributed sampler, are kept once)."""
        new_images = {image["id"]: image for image in state["images"] if image["id"] not in self.images}
        self.images.update(new_images)
        self.ground_truth.extend(a for a in state["ground_truth"] if a["image_id"] in new_images)
        self.predictions.extend(p for p in state["predictions"] if p["image_id"] in new_images)

    def merge(self, other: CocoDetectionEvaluator) -> None:
        self.load_state_dict(other.state_dict())

    def to_coco_results(self) -> list[dict]:
        """Predictions in the COCO results format, with the data's category ids when known."""
        return [
            {**p, "category_id": self.label2category_id.get(p["category_id"], p["category_id"])} for p in self.predictions
        ]

    def compute(self, verbose: bool = False) -> dict[str, float]:
        """
        Runs `COCOeval` (iouType "bbox").

        Returns:
            `dict` with `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_1`, `mar_10`, `mar_100`
            (COCOeval's -1 where a size range has no ground truth). With no prediction at all every value is 0.0
            (-1 kept where there is no ground truth).
        """
        if not self.images:
            raise ValueError("Nothing to evaluate: no image was added.")
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": list(self.images.values()),
            "annotations": [{**a, "id": i + 1} for i, a in enumerate(self.ground_truth)],
            "categories": [{"id": label, "name": name} for label, name in sorted(self.id2label.items())],
        }
        output = io.StringIO()
        with contextlib.redirect_stdout(output) if not verbose else contextlib.nullcontext():
            ground_truth.createIndex()
            if self.predictions:
                detections = ground_truth.loadRes([dict(p) for p in self.predictions])
            else:
                detections = COCO()
                detections.dataset = {"images": ground_truth.dataset["images"], "annotations": [], "categories": ground_truth.dataset["categories"]}
                detections.createIndex()
            evaluator = COCOeval(ground_truth, detections, iouType="bbox")
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return {key: float(value) for key, value in zip(METRIC_KEYS, evaluator.stats)}


def evaluate_model(
    model,
    processor,
    dataloader: Iterable[Mapping],
    generation_kwargs: Mapping | None = None,
    accelerator=None,
    label2category_id: Mapping[int, int] | None = None,
    return_predictions: bool = False,
):
    """
    Detects objects in every batch of `dataloader` with batched generation and scores them with COCO metrics.

    Args:
        model (`Pix2SeqForObjectDetection`): the model (unwrapped), in eval mode or not (it is put in eval mode).
        processor (`Pix2SeqProcessor`): reads the generated tokens back into boxes.
        dataloader: yields batches with `pixel_values` `[B, 3, S, S]` and `targets`, per image a dict with `image_id`,
            `orig_size` (`(height, width)`), `boxes` (`[n, 4]` xyxy pixels), `labels` and `iscrowd` (the evaluation
            batches of `pix2seq_hf.data.Pix2SeqCollator`).
        generation_kwargs (`dict`, *optional*): passed to `model.generate` (e.g. `{"do_sample": False}`).
        accelerator (`accelerate.Accelerator`, *optional*): with several processes, each evaluates its shard and the
            results are gathered on every process.
        label2category_id (`dict`, *optional*): for `to_coco_results` in the returned predictions.
        return_predictions (`bool`, *optional*): also return the predictions in the COCO results format.

    Returns:
        `dict` of metrics (see `CocoDetectionEvaluator.compute`), or `(metrics, predictions)`.
    """
    was_training = model.training
    model.eval()
    evaluator = CocoDetectionEvaluator(model.config.id2label, label2category_id)
    device = next(model.parameters()).device
    generation_kwargs = dict(generation_kwargs or {})
    generation_kwargs.update(return_dict_in_generate=True, output_logits=True)
    for batch in dataloader:
        targets = batch["targets"]
        with torch.no_grad():
            outputs = model.generate(batch["pixel_values"].to(device), **generation_kwargs)
        sizes = [tuple(int(v) for v in target["orig_size"]) for target in targets]
        detections = processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
        for target, found, (height, width) in zip(targets, detections, sizes):
            image_id = int(torch.as_tensor(target["image_id"]).reshape(-1)[0])
            if image_id in evaluator.images:
                continue  # an image repeated to even out the shards of a distributed sampler
            evaluator.add_ground_truth(image_id, height, width, target["boxes"], target["labels"], target.get("iscrowd"))
            evaluator.add_predictions(image_id, found["boxes"], found["labels"], found["scores"])
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        states = gather_object([evaluator.state_dict()])
        merged = CocoDetectionEvaluator(model.config.id2label, label2category_id)
        for state in states:
            merged.load_state_dict(state)
        evaluator = merged
    metrics = evaluator.compute()
    model.train(was_training)
    if return_predictions:
        return metrics, evaluator.to_coco_results()
    return metrics


def load_coco_detection_metric(**kwargs):
    """The `evaluate` metric module shipped with this package (no Hub access): `evaluate.load` of its local path."""
    import os

    import evaluate

    path = os.path.join(os.path.dirname(__file__), "metrics", "coco_detection", "coco_detection.py")
    return evaluate.load(path, **kwargs)


__all__ = ["METRIC_KEYS", "CocoDetectionEvaluator", "evaluate_model", "load_coco_detection_metric"]
