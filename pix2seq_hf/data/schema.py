"""
The common example format of the data layer, and the cleaning of one image's objects into it.

Every adapter (HF `datasets` in CPPE-5 or xyxy style, a COCO json + image folder, the synthetic shapes set) produces a
`datasets.Dataset` with the CPPE-5 schema plus an `iscrowd` flag per object:

```
image      datasets.Image          the picture (decoded lazily, from bytes or from a file path)
image_id   int64                   unique within the split
width      int32                   width of the stored image, in pixels
height     int32                   height of the stored image, in pixels
objects    id        list[int64]     annotation id (COCO id, or a running number)
           area      list[float32]   object area in pixels (COCO's segment area when the json gives it)
           bbox      list[[4]float32] COCO [x, y, w, h] in absolute pixels, clipped to the image, w > 0 and h > 0
           category  list[ClassLabel] contiguous label in [0, num_classes); the names are `id2label`
           iscrowd   list[int8]       1 for COCO crowd regions (kept for evaluation, dropped for training)
```
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as tvF


logger = logging.getLogger(__name__)


def detection_features(label_names: Sequence[str], image_feature: datasets.Image | None = None) -> datasets.Features:
    """
    The `datasets.Features` of the common example format.

    Args:
        label_names (`Sequence[str]`): class names, label `i` is `label_names[i]`.
        image_feature (`datasets.Image`, *optional*): the image feature (defaults to a decoding `datasets.Image()`).

    Returns:
        `datasets.Features` with `image`, `image_id`, `width`, `height` and `objects` (see the module docstring).
    """
    return datasets.Features(
        {
            "image": image_feature if image_feature is not None else datasets.Image(),
            "image_id": datasets.Value("int64"),
            "width": datasets.Value("int32"),
            "height": datasets.Value("int32"),
            "objects": {
                "id": datasets.List(datasets.Value("int64")),
                "area": datasets.List(datasets.Value("float32")),
                "bbox": datasets.List(datasets.List(datasets.Value("float32"), length=4)),
                "category": datasets.List(datasets.ClassLabel(names=list(label_names))),
                "iscrowd": datasets.List(datasets.Value("int8")),
            },
        }
    )


def get_id2label(dataset: datasets.Dataset) -> dict[int, str]:
    """
    Reads `id2label` off a dataset in the common format (the names of its `objects.category` ClassLabel).

    Raises:
        `ValueError` when the dataset has no `objects.category` ClassLabel feature.
    """
    objects = dataset.features.get("objects")
    category = objects.get("category") if isinstance(objects, Mapping) else None
    names = getattr(getattr(category, "feature", None), "names", None)
    if names is None:
        raise ValueError(
            "The dataset is not in the common detection format: expected `objects.category` to be a list of "
            f"ClassLabel, got features {dataset.features}. Prepare it with `prepare_detection_dataset` first."
        )
    return dict(enumerate(names))


def unique_label_names(names: Sequence[str], ids: Sequence[int]) -> list[str]:
    """Class names usable by a `ClassLabel` (which needs unique names): a repeated name gets its id appended."""
    counts: dict[str, int] = {}
    for name in names:
        counts[name] = counts.get(name, 0) + 1
    return [name if counts[name] == 1 else f"{name}_{category_id}" for name, category_id in zip(names, ids)]


def objects_per_image(dataset: datasets.Dataset) -> np.ndarray:
    """
    The number of objects a training sequence would hold for every example of a dataset in the common format (crowd
    regions left out, as training leaves them out), read from its Arrow table: no image is decoded.

    Args:
        dataset (`datasets.Dataset`): examples with an `objects` column (see the module docstring).

    Returns:
        `np.ndarray` of int64, one count per example in the dataset's order (empty for an empty dataset).
    """
    counts = []
    for chunk in dataset.with_format("arrow")["objects"].chunks:
        count = pc.list_value_length(chunk.field("bbox")).to_numpy(zero_copy_only=False).astype(np.int64)
        if "iscrowd" in [field.name for field in chunk.type]:
            iscrowd = chunk.field("iscrowd")
            flags = pc.list_flatten(iscrowd).to_numpy(zero_copy_only=False)
            rows = pc.list_parent_indices(iscrowd).to_numpy(zero_copy_only=False)
            count -= np.bincount(rows, weights=flags != 0, minlength=len(chunk)).astype(np.int64)
        counts.append(count)
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


@dataclass
class AnnotationStats:
    """
    Counts of what an adapter kept, fixed or dropped. Problems are logged once per split (see `log_warnings`) and stay
    readable here (`DetectionSplit.stats`).
    """

    images: int = 0
    objects: int = 0
    crowd_objects: int = 0
    images_without_objects: int = 0
    clipped_boxes: int = 0
    dropped_outside_boxes: int = 0
    dropped_empty_boxes: int = 0
    dropped_nonfinite_boxes: int = 0
    skipped_missing_images: int = 0
    skipped_unreadable_images: int = 0

    _MESSAGES = {
        "clipped_boxes": "boxes partly outside their image were clipped to it",
        "dropped_outside_boxes": "boxes entirely outside their image were dropped",
        "dropped_empty_boxes": "boxes of zero (or negative) width or height were dropped",
        "dropped_nonfinite_boxes": "boxes with NaN or infinite coordinates were dropped",
        "skipped_missing_images": "images whose file is missing were skipped",
        "skipped_unreadable_images": "images that could not be decoded were skipped",
    }

    def add(self, counts: Mapping[str, int]) -> None:
        """Adds the counts of `counts` (field name -> count)."""
        for name, value in counts.items():
            setattr(self, name, getattr(self, name) + int(value))

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def log_warnings(self, split_name: str) -> None:
        """Logs one warning summarising every fix or drop (nothing when the data was clean)."""
        problems = [
            f"{getattr(self, name)} {message}" for name, message in self._MESSAGES.items() if getattr(self, name)
        ]
        if problems:
            logger.warning(f"Detection data {split_name!r}: " + "; ".join(problems) + ".")


# Field order of the per-record counts written by the adapters' `datasets.map` (summed into `AnnotationStats`).
STAT_FIELDS = tuple(f.name for f in dataclasses.fields(AnnotationStats))


@dataclass
class DetectionSplit:
    """
    One prepared split: the dataset in the common format and what is needed to read its labels.

    Attributes:
        dataset (`datasets.Dataset`): the examples (see the module docstring).
        id2label (`dict[int, str]`): contiguous label -> class name.
        label2category_id (`dict[int, int]`): contiguous label -> the dataset's own category id (COCO's 1..90 ids;
            the identity for data whose categories already are 0..num_classes-1). Use it to export predictions in
            the original ids.
        stats (`AnnotationStats`): counts of kept, fixed and dropped boxes and images.
        name (`str`): the split's name in messages.
    """

    dataset: datasets.Dataset
    id2label: dict[int, str]
    label2category_id: dict[int, int]
    stats: AnnotationStats = field(default_factory=AnnotationStats)
    name: str = "dataset"

    @property
    def category_id2label(self) -> dict[int, int]:
        """The dataset's own category id -> contiguous label."""
        return {category_id: label for label, category_id in self.label2category_id.items()}


def clean_objects(
    boxes: Sequence[Sequence[float]],
    categories: Sequence,
    width: int,
    height: int,
    bbox_format: str,
    category_to_label: Callable[[object], int],
    record: str,
    ids: Sequence | None = None,
    areas: Sequence | None = None,
    iscrowd: Sequence | None = None,
    first_id: int = 0,
) -> tuple[dict[str, list], dict[str, int]]:
    """
    Cleans the objects of one image into the common format.

    Boxes are clipped to the image (with torchvision's box ops); a box left with no area is dropped (counted as
    outside the image), as is a box that had zero or negative width/height to begin with, or a non-finite one.

    Args:
        boxes (`Sequence[Sequence[float]]`): boxes in absolute pixels, `bbox_format` ("xywh" or "xyxy").
        categories (`Sequence`): the dataset's category of each box.
        width, height (`int`): size of the image.
        bbox_format (`str`): "xywh" (COCO) or "xyxy".
        category_to_label (`Callable`): dataset category -> contiguous label; raises `KeyError` for an unknown one.
        record (`str`): how to name this image in errors (e.g. "train[12] (image_id 42)").
        ids, areas, iscrowd (`Sequence`, *optional*): per-object annotation ids, areas and crowd flags.
        first_id (`int`): annotation ids are `first_id + i` when `ids` is not given.

    Returns:
        `(objects, counts)`: `objects` has the lists `id`, `area`, `bbox` (xywh), `category` (labels), `iscrowd`;
        `counts` maps `AnnotationStats` field names to counts for this image.

    Raises:
        `ValueError` naming the record and object for a malformed box, a category missing from the label map, or
        lists of different lengths.
    """
    counts = dict.fromkeys(STAT_FIELDS, 0)
    counts["images"] = 1
    num = len(boxes)
    for name, values in (("category", categories), ("id", ids), ("area", areas), ("iscrowd", iscrowd)):
        if values is not None and len(values) != num:
            raise ValueError(
                f"{record}: {num} boxes but {len(values)} values of `{name}`; they must match one to one."
            )

    labels = []
    for index, category in enumerate(categories):
        try:
            labels.append(int(category_to_label(category)))
        except KeyError:
            raise ValueError(f"{record}, object {index}: category {category!r} is not in the label map.") from None

    parsed = []
    for index, box in enumerate(boxes):
        try:
            values = [float(v) for v in box]
        except (TypeError, ValueError):
            values = []
        if len(values) != 4:
            raise ValueError(f"{record}, object {index}: a box must be 4 numbers, got {box!r}.")
        parsed.append(values)

    objects = {"id": [], "area": [], "bbox": [], "category": [], "iscrowd": []}
    if num == 0:
        counts["images_without_objects"] = 1
        return objects, counts

    given = torch.tensor(parsed, dtype=torch.float64)
    finite = torch.isfinite(given).all(dim=1)
    safe = torch.where(finite[:, None], given, torch.zeros_like(given))
    xyxy = tv_tensors.BoundingBoxes(safe, format=bbox_format.upper(), canvas_size=(height, width))
    xyxy = tvF.convert_bounding_box_format(xyxy, new_format="XYXY")
    empty = (xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])
    clipped = tvF.clamp_bounding_boxes(xyxy)
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    changed = (clipped != xyxy).any(dim=1)
    xywh = tvF.convert_bounding_box_format(clipped, new_format="XYWH").as_subclass(torch.Tensor)

    for index in range(num):
        if not finite[index]:
            counts["dropped_nonfinite_boxes"] += 1
            continue
        if empty[index]:
            counts["dropped_empty_boxes"] += 1
            continue
        if outside[index]:
            counts["dropped_outside_boxes"] += 1
            continue
        counts["clipped_boxes"] += int(changed[index])
        box = xywh[index].tolist()
        box_area = box[2] * box[3]
        area = float(areas[index]) if areas is not None and areas[index] is not None else math.nan
        if not math.isfinite(area) or area <= 0:
            area = box_area
        elif changed[index]:
            # A given area (COCO's segment area) is kept, but no larger than the clipped box.
            area = min(area, box_area)
        crowd = int(bool(iscrowd[index])) if iscrowd is not None and iscrowd[index] is not None else 0
        objects["id"].append(int(ids[index]) if ids is not None else first_id + index)
        objects["area"].append(area)
        objects["bbox"].append(box)
        objects["category"].append(labels[index])
        objects["iscrowd"].append(crowd)
        counts["crowd_objects"] += crowd

    counts["objects"] = len(objects["bbox"])
    counts["images_without_objects"] = int(not objects["bbox"])
    return objects, counts
