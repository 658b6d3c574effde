"""
Adapter from a local COCO detection json + image folder (COCO 2017, Objects365, any COCO-style set) to the common
example format (see `schema.py`).

The result is a `datasets.Dataset` whose `image` column holds file paths, decoded lazily when an example is read.
COCO's category ids (1..90 with gaps for COCO, 1..365 for Objects365) become contiguous labels `0..num_classes-1` in
the order of the ids; `DetectionSplit.label2category_id` keeps the way back for exporting predictions.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Mapping

import datasets

from .images import ImageReadError, check_image, image_size, validate_image_options
from .schema import AnnotationStats, DetectionSplit, clean_objects, detection_features, unique_label_names


logger = logging.getLogger(__name__)


def _read_json(annotation_file: str) -> dict:
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file {annotation_file!r} does not exist.")
    try:
        with open(annotation_file, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"COCO annotation file {annotation_file!r} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(
            f"COCO annotation file {annotation_file!r} must hold a JSON object, got {type(data).__name__}."
        )
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(
                f"COCO annotation file {annotation_file!r} needs a list {key!r}; its keys are {sorted(data)}."
            )
    return data


def _fields(entry, keys: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, Mapping) or any(key not in entry for key in keys):
        found = sorted(entry) if isinstance(entry, Mapping) else type(entry).__name__
        raise ValueError(f"{where} must have the keys {list(keys)}, got {found}.")


def _integer(value, where: str, name: str, minimum: int | None = None) -> int:
    """A json field that holds an integer (`3` or `3.0`), or a `ValueError` naming the record, field and value."""
    integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not integral:
        raise ValueError(f"{where}: {name} must be an integer, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ValueError(f"{where}: {name} must be at least {minimum}, got {value!r}.")
    return int(value)


def _number(value, where: str, name: str) -> float:
    """A json field that holds a number, or a `ValueError` naming the record, field and value."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {name} must be a number, got {value!r}.")
    return float(value)


def _text(value, where: str, name: str) -> str:
    """A json field that holds a non-empty string, or a `ValueError` naming the record, field and value."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: {name} must be a non-empty string, got {value!r}.")
    return value


def load_coco_detection(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    check_images: str = "exists",
    on_bad_image: str = "error",
    label2category_id: Mapping[int, int] | None = None,
    split_name: str | None = None,
) -> DetectionSplit:
    """
    Reads a COCO detection json and its image folder into the common example format.

    Args:
        annotation_file (`str` or `os.PathLike`): the json (`images`, `annotations`, `categories`; a json without
            `annotations`, such as COCO's test-dev image info, gives images without objects).
        image_dir (`str` or `os.PathLike`): the folder that the images' `file_name` are relative to.
        check_images (`str`, *optional*, defaults to `"exists"`): "none", "exists" (every file exists: one `stat`
            per image) or "decode" (every file decodes: reads them all, slow on big sets). Images that are not
            checked fail later, when they are read.
        on_bad_image (`str`, *optional*, defaults to `"error"`): for an image that fails the check: "error", or
            "skip" it with a warning (counted in `stats.skipped_missing_images` / `stats.skipped_unreadable_images`).
        label2category_id (`Mapping[int, int]`, *optional*): contiguous label -> COCO category id to use (e.g. the
            training split's, so that a validation split shares its labels). Defaults to the json's categories
            sorted by id.
        split_name (`str`, *optional*): names the split in messages (defaults to the json file name).

    Returns:
        `DetectionSplit` with the dataset (image paths, lazily decoded), `id2label` from the json category names,
        `label2category_id` and `stats`.

    Raises:
        `FileNotFoundError` for a missing json or image folder; `ValueError` for malformed json, no images, a
        repeated image id, an annotation of an unknown image or category, a malformed box, or (with
        `on_bad_image="error"`) a missing or unreadable image. Each names the file and the image/annotation id.
    """
    validate_image_options(check_images, on_bad_image)
    annotation_file, image_dir = os.fspath(annotation_file), os.fspath(image_dir)
    split_name = split_name or os.path.basename(annotation_file)
    data = _read_json(annotation_file)
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"Image folder {image_dir!r} (for {annotation_file!r}) does not exist.")

    names_by_id: dict[int, str] = {}
    for position, category in enumerate(data["categories"]):
        where = f"{annotation_file}: categories[{position}]"
        _fields(category, ("id", "name"), where)
        category_id = _integer(category["id"], where, "id")
        if category_id in names_by_id:
            raise ValueError(f"{annotation_file}: category id {category_id} appears twice in 'categories'.")
        names_by_id[category_id] = _text(category["name"], where, "name")
    if label2category_id is None:
        if not names_by_id:
            raise ValueError(f"{annotation_file}: 'categories' is empty.")
        label2category_id = dict(enumerate(sorted(names_by_id)))
    else:
        label2category_id = {int(label): int(category_id) for label, category_id in label2category_id.items()}
        if sorted(label2category_id) != list(range(len(label2category_id))):
            raise ValueError(
                f"`label2category_id` must have the labels 0..n-1 as keys, got {sorted(label2category_id)}."
            )
    category_to_label = {category_id: label for label, category_id in label2category_id.items()}
    category_ids = [label2category_id[label] for label in range(len(label2category_id))]
    label_names = unique_label_names([names_by_id.get(c, str(c)) for c in category_ids], category_ids)
    id2label = dict(enumerate(label_names))

    images = data["images"]
    if not images:
        raise ValueError(f"{annotation_file}: 'images' is empty, so the split {split_name!r} has no examples.")
    image_ids = set()
    # Each image's fields, parsed: id, file_name, and width/height (None when the json has none).
    image_entries = []
    for position, image in enumerate(images):
        where = f"{annotation_file}: images[{position}]"
        _fields(image, ("id", "file_name"), where)
        image_id = _integer(image["id"], where, "id")
        where = f"{where} (image_id {image_id})"
        file_name = _text(image["file_name"], where, "file_name")
        width, height = (
            None if image.get(key) is None else _integer(image[key], where, key, minimum=1) for key in ("width", "height")
        )
        if image_id in image_ids:
            raise ValueError(f"{annotation_file}: image id {image_id} appears twice in 'images'.")
        image_ids.add(image_id)
        image_entries.append((image_id, file_name, width, height))

    if "annotations" not in data:
        logger.warning(f"{annotation_file} has no 'annotations': every image of {split_name!r} has no objects.")
    annotations_by_image = defaultdict(list)
    for position, annotation in enumerate(data.get("annotations") or []):
        annotation_id = annotation.get("id", f"#{position}") if isinstance(annotation, Mapping) else f"#{position}"
        where = f"{annotation_file}: annotation {annotation_id}"
        _fields(annotation, ("image_id", "bbox", "category_id"), where)
        image_id = _integer(annotation["image_id"], where, "image_id")
        if image_id not in image_ids:
            raise ValueError(f"{where} refers to image_id {image_id}, which is not in 'images'.")
        where = f"{where} (image_id {image_id})"
        category_id = _integer(annotation["category_id"], where, "category_id")
        if category_id not in category_to_label:
            known = sorted(category_to_label)
            raise ValueError(
                f"{where} has category_id {category_id}, which is not in the label map (category ids "
                f"{known[:20]}{' ...' if len(known) > 20 else ''})."
            )
        bbox = annotation["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise ValueError(f"{where}: bbox must be a list of 4 numbers [x, y, width, height], got {bbox!r}.")
        annotations_by_image[image_id].append(
            {
                "id": _integer(annotation["id"], where, "id") if annotation.get("id") is not None else None,
                "bbox": [_number(value, where, "bbox") for value in bbox],
                "category_id": category_id,
                "area": _number(annotation["area"], where, "area") if annotation.get("area") is not None else None,
                "iscrowd": _integer(annotation.get("iscrowd") or 0, where, "iscrowd"),
            }
        )

    stats = AnnotationStats()
    columns = {"image": [], "image_id": [], "width": [], "height": [], "objects": []}
    for image_id, file_name, width, height in image_entries:
        path = os.path.abspath(os.path.join(image_dir, file_name))
        record = f"{annotation_file}: image_id {image_id} ({file_name})"
        try:
            check_image(path, record, check_images)
            if width is None or height is None:
                width, height = image_size(path, record)  # as shown: EXIF orientation applied, as when decoded
        except ImageReadError as error:
            if on_bad_image == "error":
                raise
            stats.add({"skipped_missing_images" if error.missing else "skipped_unreadable_images": 1})
            continue
        annotations = annotations_by_image.get(image_id, [])
        objects, counts = clean_objects(
            [annotation["bbox"] for annotation in annotations],
            [annotation["category_id"] for annotation in annotations],
            width,
            height,
            "xywh",
            category_to_label.__getitem__,
            record,
            ids=[
                image_id * 1000 + i if annotation["id"] is None else annotation["id"]
                for i, annotation in enumerate(annotations)
            ],
            areas=[annotation["area"] for annotation in annotations],
            iscrowd=[annotation["iscrowd"] for annotation in annotations],
        )
        stats.add(counts)
        columns["image"].append(path)
        columns["image_id"].append(image_id)
        columns["width"].append(width)
        columns["height"].append(height)
        columns["objects"].append(objects)

    if not columns["image"]:
        raise ValueError(f"{annotation_file}: no usable image left in split {split_name!r}: {stats.to_dict()}.")
    dataset = datasets.Dataset.from_dict(columns, features=detection_features(label_names))
    stats.log_warnings(split_name)
    return DetectionSplit(dataset, id2label, label2category_id, stats, split_name)
