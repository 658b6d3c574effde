"""COCO detection metrics through pycocotools, and batched evaluation of a Pix2Seq model on a dataloader or dataset."""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval


# The order of `COCOeval.stats` for boxes.
METRIC_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")

# Scores are probabilities in [0, 1]; a threshold below 0 keeps every decoded object, as the official evaluation does
# (the processor keeps scores strictly above the threshold, so 0.0 would drop objects whose probability underflowed).
KEEP_ALL_THRESHOLD = -1.0


def _image_id(value) -> int:
    """An image id given as an int, a numpy integer or a one-element tensor/array, as a Python int."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        count = value.size if isinstance(value, np.ndarray) else value.numel()
        if count != 1:
            raise ValueError(f"An image id must be one integer, got an array of shape {tuple(value.shape)}.")
        value = value.reshape(-1)[0].item()
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"An image id must be an integer, got {value!r} ({type(value).__name__}).")
    return int(value)


def _as_boxes(boxes, image_id: int, what: str) -> list[list[float]]:
    """`[n, 4]` xyxy boxes (any array-like, any device) as Python floats; checks shape, finiteness and order."""
    tensor = torch.as_tensor(boxes, dtype=torch.float64).detach().cpu()
    if tensor.numel() == 0:
        return []
    if tensor.ndim != 2 or tensor.shape[1] != 4:
        raise ValueError(f"Image {image_id}: {what} boxes must have shape [n, 4] (xyxy), got {tuple(tensor.shape)}.")
    finite = torch.isfinite(tensor).all(dim=1)
    if not finite.all():
        bad = int(torch.nonzero(~finite)[0])
        raise ValueError(f"Image {image_id}: {what} box {bad} has a non-finite coordinate: {tensor[bad].tolist()}.")
    inverted = (tensor[:, 2] < tensor[:, 0]) | (tensor[:, 3] < tensor[:, 1])
    if inverted.any():
        bad = int(torch.nonzero(inverted)[0])
        raise ValueError(
            f"Image {image_id}: {what} box {bad} is not (x_min, y_min, x_max, y_max) with min <= max: "
            f"{tensor[bad].tolist()}."
        )
    return tensor.tolist()


def _as_integers(values, image_id: int, what: str) -> list[int]:
    """A flat list of ints from any array-like; floats are accepted only when they hold whole numbers."""
    tensor = torch.as_tensor(values).detach().reshape(-1).cpu()
    if tensor.is_floating_point() and not (torch.isfinite(tensor).all() and torch.equal(tensor, tensor.round())):
        raise ValueError(f"Image {image_id}: {what} must be integers, got {tensor.tolist()}.")
    return [int(v) for v in tensor.tolist()]


def _as_floats(values, image_id: int, what: str) -> list[float]:
    """A flat list of finite floats from any array-like."""
    tensor = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1).cpu()
    if not torch.isfinite(tensor).all():
        bad = int(torch.nonzero(~torch.isfinite(tensor))[0])
        raise ValueError(f"Image {image_id}: {what} {bad} is not finite ({tensor[bad].item()}).")
    return tensor.tolist()


def _categories_to_id2label(categories) -> dict[int, str]:
    """`id2label` (`{id: name}`) or COCO `categories` (`[{"id", "name", ...}]`) as `{int id: str name}`."""
    if isinstance(categories, Mapping):
        items = list(categories.items())
    elif isinstance(categories, Sequence) and not isinstance(categories, str):
        items = []
        for index, category in enumerate(categories):
            if not isinstance(category, Mapping) or "id" not in category:
                raise ValueError(f"categories[{index}] must be a dict with an 'id' (and a 'name'), got {category!r}.")
            items.append((category["id"], category.get("name", str(category["id"]))))
    else:
        raise TypeError(
            f"`categories` must be an id2label dict or a list of COCO category dicts, got {type(categories).__name__}."
        )
    if not items:
        raise ValueError("`categories` is empty: there must be at least one class to evaluate.")
    id2label = {}
    for key, name in items:
        try:
            label = int(key)  # JSON turns int keys into strings
        except (TypeError, ValueError):
            raise ValueError(f"Category ids must be integers, got {key!r}.") from None
        if label in id2label:
            raise ValueError(f"Category id {label} is given twice.")
        id2label[label] = str(name)
    return id2label


class CocoDetectionEvaluator:
    """
    Accumulates ground truth and predictions image by image and computes the COCO box metrics with pycocotools
    `COCOeval` (iouType `"bbox"`), keeping every prediction (no score threshold, as the paper evaluates).

    Args:
        categories (`dict[int, str]` or `list[dict]`):
            The classes: an `id2label` dict (the model's labels) or COCO `categories` (`[{"id": 1, "name": ...}]`).
            The `labels` given to `add_ground_truth` / `add_predictions` are these ids.
        label2category_id (`dict[int, int]`, *optional*):
            The data's own category id of each label (COCO's ids are not contiguous); only used to write the
            predictions in the data's ids (`to_coco_results`). Labels missing from it keep their id.

    Boxes are absolute `(x_min, y_min, x_max, y_max)` pixels of the original image. Ground truth follows COCO: crowd
    objects (`iscrowd=1`) are regions where detections are ignored, neither true nor false positives, and the `area`
    of an object (its segmentation area in COCO, the box area by default) decides its small / medium / large range.

    For several processes, each accumulates its own images; `gather(accelerator)` (or `state_dict` /
    `from_state` / `merge`, whose state is plain Python lists and dicts, JSON-serialisable) joins them. An image seen
    twice (the padding of a distributed sampler) is kept once.

    Example:

    ```python
    >>> evaluator = CocoDetectionEvaluator({0: "cat", 1: "dog"})
    >>> evaluator.add_ground_truth(1, height=100, width=120, boxes=[[10, 10, 50, 60]], labels=[0])
    >>> evaluator.add_predictions(1, boxes=[[10, 10, 50, 60], [60, 20, 110, 90]], labels=[0, 1], scores=[0.9, 0.3])
    >>> round(evaluator.compute()["map"], 4)
    1.0
    ```
    """

    def __init__(self, categories, label2category_id: Mapping[int, int] | None = None):
        self.id2label = _categories_to_id2label(categories)
        self.label2category_id = {int(k): int(v) for k, v in (label2category_id or {}).items()}
        self.images: dict[int, dict] = {}
        self.ground_truth: list[dict] = []
        self.predictions: list[dict] = []

    def __len__(self) -> int:
        """The number of images added."""
        return len(self.images)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(classes={len(self.id2label)}, images={len(self.images)}, "
            f"ground_truth={len(self.ground_truth)}, predictions={len(self.predictions)})"
        )

    def _check_labels(self, labels: list[int], image_id: int, what: str) -> None:
        unknown = sorted({label for label in labels if label not in self.id2label})
        if unknown:
            raise ValueError(
                f"Image {image_id}: {what} labels {unknown} are not among the classes {sorted(self.id2label)}."
            )

    def add_ground_truth(self, image_id, height, width, boxes, labels, iscrowd=None, areas=None) -> None:
        """
        Adds one image and its ground-truth objects.

        Args:
            image_id (`int`): unique id of the image.
            height, width (`int`): size of the original image, in pixels.
            boxes (array-like `[n, 4]`): `(x_min, y_min, x_max, y_max)` in pixels of the original image.
            labels (array-like `[n]`): class ids (keys of `categories`).
            iscrowd (array-like `[n]` of 0/1, *optional*): crowd regions; all 0 by default.
            areas (array-like `[n]`, *optional*): object areas for the size ranges (COCO's segmentation areas); the
                box areas by default.

        Raises:
            `ValueError` for an image added twice, malformed or non-finite boxes, unknown labels, or lengths that
            disagree.
        """
        image_id = _image_id(image_id)
        if image_id in self.images:
            raise ValueError(f"Image {image_id} was added twice.")
        height, width = int(height), int(width)
        if height <= 0 or width <= 0:
            raise ValueError(f"Image {image_id}: size must be positive, got height={height}, width={width}.")
        boxes = _as_boxes(boxes, image_id, "ground-truth")
        labels = _as_integers(labels, image_id, "ground-truth labels")
        crowd = _as_integers(iscrowd, image_id, "iscrowd") if iscrowd is not None else [0] * len(labels)
        box_areas = [(x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in boxes]
        areas = _as_floats(areas, image_id, "area") if areas is not None else box_areas
        if not len(boxes) == len(labels) == len(crowd) == len(areas):
            raise ValueError(
                f"Image {image_id}: {len(boxes)} boxes, {len(labels)} labels, {len(crowd)} crowd flags and "
                f"{len(areas)} areas; one of each per object is needed."
            )
        if any(flag not in (0, 1) for flag in crowd):
            raise ValueError(f"Image {image_id}: iscrowd must be 0 or 1, got {crowd}.")
        if any(area < 0 for area in areas):
            raise ValueError(f"Image {image_id}: areas must be non-negative, got {areas}.")
        self._check_labels(labels, image_id, "ground-truth")
        self.images[image_id] = {"id": image_id, "height": height, "width": width}
        for (x0, y0, x1, y1), label, flag, area in zip(boxes, labels, crowd, areas):
            self.ground_truth.append(
                {
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": area,
                    "iscrowd": flag,
                }
            )

    def add_predictions(self, image_id, boxes, labels, scores) -> None:
        """
        Adds the detections of an image already added with `add_ground_truth` (all of them: no threshold).

        Args:
            image_id (`int`): the image.
            boxes (array-like `[n, 4]`): `(x_min, y_min, x_max, y_max)` in pixels of the original image.
            labels (array-like `[n]`): class ids.
            scores (array-like `[n]`): confidences; they rank the detections.

        Raises:
            `ValueError` for an image without ground truth, malformed or non-finite boxes or scores, unknown labels,
            or lengths that disagree.
        """
        image_id = _image_id(image_id)
        if image_id not in self.images:
            raise ValueError(
                f"Predictions for image {image_id}, which has no ground truth: call add_ground_truth for it first "
                "(with empty boxes for an image without objects)."
            )
        boxes = _as_boxes(boxes, image_id, "predicted")
        labels = _as_integers(labels, image_id, "predicted labels")
        scores = _as_floats(scores, image_id, "score")
        if not len(boxes) == len(labels) == len(scores):
            raise ValueError(f"Image {image_id}: {len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores.")
        self._check_labels(labels, image_id, "predicted")
        for (x0, y0, x1, y1), label, score in zip(boxes, labels, scores):
            self.predictions.append(
                {"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            )

    # ----- state across processes ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything the evaluator holds, as plain lists and dicts (picklable and JSON-serialisable)."""
        return {
            "categories": [{"id": label, "name": name} for label, name in sorted(self.id2label.items())],
            "label2category_id": dict(self.label2category_id),
            "images": [dict(image) for image in self.images.values()],
            "ground_truth": [dict(annotation) for annotation in self.ground_truth],
            "predictions": [dict(prediction) for prediction in self.predictions],
        }

    @classmethod
    def from_state(cls, state: Mapping) -> CocoDetectionEvaluator:
        """An evaluator holding a `state_dict` (e.g. read back from JSON)."""
        evaluator = cls(state["categories"], state.get("label2category_id"))
        evaluator.merge(state)
        return evaluator

    def merge(self, other: CocoDetectionEvaluator | Mapping) -> None:
        """
        Adds the images, ground truth and predictions of another evaluator (or of its `state_dict`). Images this one
        already holds are skipped (a distributed sampler repeats images to even out its shards).

        Raises:
            `ValueError` when the classes differ, or when an image id comes back with another size (two different
            images sharing an id).
        """
        state = other.state_dict() if isinstance(other, CocoDetectionEvaluator) else other
        other_labels = _categories_to_id2label(state["categories"])
        if other_labels != self.id2label:
            raise ValueError(f"Cannot merge evaluators of different classes: {self.id2label} and {other_labels}.")
        new_images = {}
        for image in state["images"]:
            image_id = int(image["id"])
            known = self.images.get(image_id)
            if known is not None and (known["height"], known["width"]) != (image["height"], image["width"]):
                raise ValueError(
                    f"Image {image_id} is {known['height']}x{known['width']} here and "
                    f"{image['height']}x{image['width']} "
                    "in the merged state: two different images share this id."
                )
            if known is None:
                new_images[image_id] = {"id": image_id, "height": int(image["height"]), "width": int(image["width"])}
        self.images.update(new_images)
        self.ground_truth.extend(dict(a) for a in state["ground_truth"] if a["image_id"] in new_images)
        self.predictions.extend(dict(p) for p in state["predictions"] if p["image_id"] in new_images)

    def gather(self, accelerator=None) -> CocoDetectionEvaluator:
        """
        Joins the evaluators of every process (each process must call this). Returns `self` with one process or no
        `accelerator`, otherwise a new evaluator holding every process's images (on every process).
        """
        if accelerator is None or accelerator.num_processes <= 1:
            return self
        from accelerate.utils import gather_object

        states = gather_object([self.state_dict()])
        merged = type(self)(self.id2label, self.label2category_id)
        for state in states:
            merged.merge(state)
        return merged

    # ----- results --------------------------------------------------------------------------------------------

    def to_coco_results(self) -> list[dict]:
        """The predictions in the COCO results format (`image_id`, `category_id`, `bbox` xywh, `score`), with the
        data's category ids when `label2category_id` is known."""
        return [
            {**p, "category_id": self.label2category_id.get(p["category_id"], p["category_id"])}
            for p in self.predictions
        ]

    def _coco_objects(self) -> tuple[COCO, COCO]:
        ground_truth = COCO()
        ground_truth.dataset = {
            "images": list(self.images.values()),
            # COCOeval marks unmatched detections with annotation id 0, so ids start at 1.
            "annotations": [{**a, "id": i + 1} for i, a in enumerate(self.ground_truth)],
            "categories": [{"id": label, "name": name} for label, name in sorted(self.id2label.items())],
        }
        ground_truth.createIndex()
        if self.predictions:
            detections = ground_truth.loadRes([dict(p) for p in self.predictions])  # loadRes writes into its input
        else:  # loadRes cannot take an empty list
            detections = COCO()
            detections.dataset = {**ground_truth.dataset, "annotations": []}
            detections.createIndex()
        return ground_truth, detections

    def compute(self, verbose: bool = False, per_class: bool = False) -> dict:
        """
        Runs `COCOeval` over every image added.

        Args:
            verbose (`bool`, *optional*): let pycocotools print its progress and summary table.
            per_class (`bool`, *optional*): also return `map_per_class` and `mar_100_per_class`, `{class name: value}`
                (the same precision/recall arrays as the overall numbers, read for one class).

        Returns:
            `dict` of floats: `map` (AP at IoU .50:.05:.95), `map_50`, `map_75`, `map_small`, `map_medium`,
            `map_large`, `mar_1`, `mar_10`, `mar_100`. A value is -1.0 (COCOeval's mark) where there is nothing to
            measure: no ground-truth object at all, or none in that size range. With ground truth but no prediction
            at all, every measurable value is 0.0. Classes without ground truth are left out of the averages (their
            detections count nowhere), and COCOeval scores at most the 100 best detections of each image and class
            (Pix2Seq writes at most `max_objects` per image), as in COCO.

        Raises:
            `ValueError` when no image was added, or (with `per_class`) when two classes share a name.
        """
        if not self.images:
            raise ValueError("Nothing to evaluate: no image was added.")
        names = [name for _, name in sorted(self.id2label.items())]
        if per_class and len(set(names)) != len(names):
            duplicated = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"per_class results are keyed by class name, and the names {duplicated} repeat.")
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            ground_truth, detections = self._coco_objects()
            evaluation = COCOeval(ground_truth, detections, iouType="bbox")
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        metrics = {key: float(value) for key, value in zip(METRIC_KEYS, evaluation.stats)}
        if per_class:
            metrics.update(self._per_class(evaluation))
        return metrics

    def _per_class(self, evaluation: COCOeval) -> dict:
        # precision: [iou thresholds, recall points, classes, area ranges, max detections]; recall without the recall
        # points. Area range 0 is "all", the last max-detections entry is 100; -1 marks "nothing to measure".
        precision, recall = evaluation.eval["precision"], evaluation.eval["recall"]
        map_per_class, mar_per_class = {}, {}
        for index, label in enumerate(evaluation.params.catIds):
            name = self.id2label[label]
            p = precision[:, :, index, 0, -1]
            r = recall[:, index, 0, -1]
            map_per_class[name] = float(p[p > -1].mean()) if (p > -1).any() else -1.0
            mar_per_class[name] = float(r[r > -1].mean()) if (r > -1).any() else -1.0
        return {"map_per_class": map_per_class, "mar_100_per_class": mar_per_class}


# ----- model evaluation ---------------------------------------------------------------------------------------


def _is_dataset(data) -> bool:
    import datasets

    return isinstance(data, (datasets.Dataset, torch.utils.data.Dataset))


def _evaluation_batches(data, processor, batch_size: int, num_workers: int, accelerator):
    """Batches from a dataloader (used as is) or from a dataset (collated by `Pix2SeqCollator`, sharded over the
    processes of `accelerator`)."""
    if isinstance(data, torch.utils.data.DataLoader) or not _is_dataset(data):
        return data
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    from .data.collator import Pix2SeqCollator

    collator = Pix2SeqCollator(processor, training=False, return_sequences=False)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, collate_fn=collator, num_workers=num_workers)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.data_loader import prepare_data_loader

        # Not `accelerator.prepare`: that would register the loader in the accelerator's checkpoint state.
        loader = prepare_data_loader(
            loader,
            accelerator.device,
            num_processes=accelerator.num_processes,
            process_index=accelerator.process_index,
            put_on_device=False,
        )
    return loader


def _model_device(model) -> torch.device:
    device = getattr(model, "device", None)
    if device is not None:
        return torch.device(device)
    parameter = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _batch_parts(batch, index: int):
    if not isinstance(batch, Mapping) or "pixel_values" not in batch or "targets" not in batch:
        found = sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(
            f"Evaluation batch {index} must be a dict with `pixel_values` and `targets` (as `Pix2SeqCollator("
            f"processor, training=False)` makes), got {found}. Pass a dataset instead to let evaluate_model "
            "collate it."
        )
    pixel_values, targets = batch["pixel_values"], batch["targets"]
    if len(targets) != len(pixel_values):
        raise ValueError(f"Evaluation batch {index} has {len(pixel_values)} images but {len(targets)} targets.")
    for target in targets:
        missing = [key for key in ("image_id", "orig_size", "boxes", "labels") if key not in target]
        if missing:
            raise ValueError(f"A target of evaluation batch {index} lacks {missing} (it has {sorted(target)}).")
    return pixel_values, targets


def evaluate_model(
    model,
    processor,
    dataloader_or_dataset: Iterable[Mapping],
    batch_size: int = 8,
    generation_kwargs: Mapping | None = None,
    detect: Callable | None = None,
    accelerator=None,
    label2category_id: Mapping[int, int] | None = None,
    return_predictions: bool = False,
    per_class: bool = False,
    num_workers: int = 0,
    progress_bar: bool = False,
):
    """
    Detects the objects of every image with batched generation and scores them with COCO metrics (every decoded
    object kept, no threshold).

    Args:
        model (`Pix2SeqForObjectDetection`):
            The model (unwrapped when `accelerator` is given). Put in eval mode for the run, then back as it was.
        processor (`Pix2SeqProcessor`):
            Reads the `generate` output back into boxes (`post_process_object_detection`).
        dataloader_or_dataset:
            Either a dataset in the common detection format (a `datasets.Dataset` or torch `Dataset`; batched by
            `batch_size` with `Pix2SeqCollator(processor, training=False)`, sharded over the processes of
            `accelerator`), or any iterable of batches (a `DataLoader`, used as is: shard it yourself, e.g. with
            `accelerator.prepare`). A batch is a dict with `pixel_values` (`[B, 3, S, S]`) and `targets`, a list of
            `B` dicts: `image_id` (int or one-element tensor), `orig_size` (`(height, width)` of the original image),
            `boxes` (`[n, 4]` xyxy pixels of the original image), `labels` (`[n]`), optionally `iscrowd` (`[n]`, 0/1)
            and `area` (`[n]`, for the COCO size ranges; box areas otherwise).
        batch_size (`int`, *optional*, defaults to 8): images per batch when a dataset is given.
        generation_kwargs (`dict`, *optional*):
            Passed to `model.generate` (e.g. `{"do_sample": False}`); the model's generation config otherwise.
            `return_dict_in_generate` and `output_logits` are always on: the scores are read from the raw logits.
        detect (`Callable`, *optional*):
            `detect(model, pixel_values)` in place of `model.generate`, returning what
            `processor.post_process_object_detection` reads (e.g. `official_evaluation.official_detect`).
        accelerator (`accelerate.Accelerator`, *optional*):
            With several processes, each evaluates its shard and the results are gathered: every process returns the
            metrics of the whole set.
        label2category_id (`dict`, *optional*): the data's category ids, for the returned predictions.
        return_predictions (`bool`, *optional*): also return the predictions in the COCO results format.
        per_class (`bool`, *optional*): also return per-class AP and AR (see `CocoDetectionEvaluator.compute`).
        num_workers (`int`, *optional*): DataLoader workers when a dataset is given.
        progress_bar (`bool`, *optional*): show a progress bar (on the main process, when its output is a terminal).

    Returns:
        `dict` of metrics (see `CocoDetectionEvaluator.compute`), or `(metrics, predictions)` with
        `return_predictions`. An image id met twice (the padding of a distributed sampler) is evaluated once.
    """
    generation_kwargs = dict(generation_kwargs or {})
    for flag in ("return_dict_in_generate", "output_logits"):
        if generation_kwargs.get(flag, True) is not True:
            raise ValueError(f"evaluate_model needs `{flag}=True`: the scores are read from the raw logits.")
        generation_kwargs[flag] = True
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    batches = _evaluation_batches(dataloader_or_dataset, processor, batch_size, num_workers, accelerator)
    if progress_bar:
        from tqdm.auto import tqdm

        main = accelerator is None or accelerator.is_local_main_process
        batches = tqdm(batches, desc="evaluation", disable=None if main else True)  # None: on a terminal only
    evaluator = CocoDetectionEvaluator(model.config.id2label, label2category_id)
    device = _model_device(model)
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(batches):
            pixel_values, targets = _batch_parts(batch, index)
            with torch.no_grad():
                if detect is not None:
                    outputs = detect(model, pixel_values.to(device))
                else:
                    outputs = model.generate(pixel_values.to(device), **generation_kwargs)
            sizes = [tuple(int(v) for v in torch.as_tensor(target["orig_size"]).reshape(-1)) for target in targets]
            detections = processor.post_process_object_detection(
                outputs, threshold=KEEP_ALL_THRESHOLD, target_sizes=sizes
            )
            for target, found, (height, width) in zip(targets, detections, sizes):
                image_id = _image_id(target["image_id"])
                if image_id in evaluator.images:
                    continue  # repeated to even out the shards of a distributed sampler
                evaluator.add_ground_truth(
                    image_id,
                    height,
                    width,
                    target["boxes"],
                    target["labels"],
                    iscrowd=target.get("iscrowd"),
                    areas=target.get("area"),
                )
                evaluator.add_predictions(image_id, found["boxes"], found["labels"], found["scores"])
    finally:
        model.train(was_training)
    evaluator = evaluator.gather(accelerator)
    metrics = evaluator.compute(per_class=per_class)
    if return_predictions:
        return metrics, evaluator.to_coco_results()
    return metrics


def coco_detection_metric_path() -> str:
    """The path of the `evaluate` metric module shipped with this package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "metrics", "coco_detection", "coco_detection.py")


def load_coco_detection_metric(**kwargs):
    """
    The COCO detection metric as an `evaluate` module, loaded from its path inside this package (no Hub access).
    `kwargs` go to `evaluate.load` (e.g. `experiment_id`, `keep_in_memory`).
    """
    import evaluate

    return evaluate.load(coco_detection_metric_path(), **kwargs)


__all__ = [
    "KEEP_ALL_THRESHOLD",
    "METRIC_KEYS",
    "CocoDetectionEvaluator",
    "coco_detection_metric_path",
    "evaluate_model",
    "load_coco_detection_metric",
]
