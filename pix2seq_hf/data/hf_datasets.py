"""
Adapter from HF `datasets` detection sets to the common example format (see `schema.py`).

Accepted inputs:
- CPPE-5 style: `image`, `image_id`, `width`, `height`, `objects` with `id`, `area`, `bbox` (COCO xywh in absolute
  pixels) and `category` (ClassLabel or plain ints), optionally `iscrowd`;
- the common COCO repackagings: `objects` with `bbox`/`bboxes` in xyxy and `category`/`label`/`category_id`,
  `objects` stored as a list of dicts or a dict of lists, `width`/`height` missing (read from the image headers).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

import datasets
import numpy as np

from .bbox_format import BBOX_FORMATS_AUTO, collect_bbox_evidence, detect_bbox_format
from .images import ImageReadError, check_image, image_size, validate_image_options
from .schema import STAT_FIELDS, AnnotationStats, DetectionSplit, clean_objects, detection_features


logger = logging.getLogger(__name__)

# Accepted names of the fields inside `objects`, first match wins.
BBOX_KEYS = ("bbox", "bboxes", "boxes", "box")
CATEGORY_KEYS = ("category", "categories", "category_id", "label", "labels")
ID_KEYS = ("id", "ids", "annotation_id", "bbox_id")
AREA_KEYS = ("area", "areas")
ISCROWD_KEYS = ("iscrowd", "is_crowd")

# Rows looked at to detect the box format.
_FORMAT_SAMPLE_SIZE = 2000


def _object_fields(dataset: datasets.Dataset, objects_column: str) -> dict:
    """The features inside `objects` (stored as a dict of lists or as a list of dicts), by field name."""
    feature = dataset.features[objects_column]
    if isinstance(feature, Mapping):
        return {name: getattr(sub, "feature", sub) for name, sub in feature.items()}
    inner = getattr(feature, "feature", None)
    if isinstance(inner, Mapping):
        return dict(inner)
    raise ValueError(
        f"Column {objects_column!r} must hold per-object fields (a dict of lists or a list of dicts with 'bbox' and "
        f"'category'), got the feature {feature}."
    )


def _find_key(
    fields: Mapping, candidates: Sequence[str], what: str, objects_column: str, required: bool
) -> str | None:
    for key in candidates:
        if key in fields:
            return key
    if required:
        raise ValueError(
            f"Column {objects_column!r} has no {what} field: expected one of {list(candidates)}, found "
            f"{sorted(fields)}."
        )
    return None


def _as_dict_of_lists(objects, keys: Sequence[str]) -> dict[str, list]:
    """Objects of one row as a dict of lists, whichever way the dataset stores them."""
    if objects is None:
        return {key: [] for key in keys}
    if isinstance(objects, Mapping):
        return {key: list(objects.get(key) or []) for key in keys}
    return {key: [obj.get(key) for obj in objects] for key in keys}


def _normalise_category(value) -> Hashable:
    """Integral floats and NumPy scalars become Python ints; strings stay strings."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _build_label_map(
    id2label: Mapping | None, class_names: Sequence[str] | None, seen_categories: Sequence[Hashable] | None
) -> tuple[dict[Hashable, int], dict[int, str], dict[int, int]]:
    """
    Returns `(category_to_label, id2label, label2category_id)`.

    - `id2label` given: its keys are the dataset's category ids, mapped in sorted order to labels 0..n-1 (so a
      contiguous map stays the identity); categories may also be given by name.
    - else ClassLabel names: the stored ints already are the labels.
    - else the categories seen in the data, sorted: ints keep their id in `label2category_id`; strings become names.
    """
    if id2label is not None:
        if not id2label:
            raise ValueError("`id2label` is empty; it must name every class.")
        keys = sorted(int(key) for key in id2label)
        names = {int(key): str(name) for key, name in id2label.items()}
        category_to_label: dict[Hashable, int] = {key: label for label, key in enumerate(keys)}
        new_id2label = {label: names[key] for label, key in enumerate(keys)}
        if len(set(new_id2label.values())) == len(new_id2label):
            category_to_label.update({name: label for label, name in new_id2label.items()})
        return category_to_label, new_id2label, dict(enumerate(keys))
    if class_names is not None:
        labels = range(len(class_names))
        return {label: label for label in labels}, dict(enumerate(class_names)), {label: label for label in labels}
    seen = sorted(set(seen_categories or ()), key=lambda value: (isinstance(value, str), value))
    if any(isinstance(value, str) for value in seen):
        if not all(isinstance(value, str) for value in seen):
            raise ValueError(f"The dataset mixes category names and ids: {seen[:10]}. Pass `id2label`.")
        return (
            {name: label for label, name in enumerate(seen)},
            dict(enumerate(seen)),
            {i: i for i in range(len(seen))},
        )
    category_to_label = {category: label for label, category in enumerate(seen)}
    return category_to_label, {label: str(category) for label, category in enumerate(seen)}, dict(enumerate(seen))


def _record_name(split_name: str, index: int, image_id) -> str:
    return f"{split_name}[{index}] (image_id {image_id})"


def prepare_detection_dataset(
    dataset: datasets.Dataset,
    bbox_format: str = "auto",
    id2label: Mapping[int, str] | None = None,
    objects_column: str = "objects",
    image_column: str = "image",
    check_images: str = "none",
    on_bad_image: str = "error",
    split_name: str = "dataset",
    num_proc: int | None = None,
) -> DetectionSplit:
    """
    Converts a HF detection dataset into the common example format (see `schema.py`).

    Boxes are converted to COCO xywh, clipped to their image, and dropped when nothing is left of them (or when they
    had no area or were not finite); every fix is counted in `DetectionSplit.stats` and summarised in one warning.
    Images without objects are kept. Crowd objects are kept with their `iscrowd` flag (the training collator drops
    them). Other columns are removed.

    Args:
        dataset (`datasets.Dataset`): one split.
        bbox_format (`str`, *optional*, defaults to `"auto"`): "xywh" (COCO, CPPE-5), "xyxy", or "auto" (detected
            from the boxes, see `detect_bbox_format`).
        id2label (`Mapping[int, str]`, *optional*): the dataset's category id -> class name. Defaults to the names
            of the `category` ClassLabel, else to the categories found in the data. Give the training split's map
            when preparing an evaluation split.
        objects_column (`str`, *optional*, defaults to `"objects"`): the column of per-image objects.
        image_column (`str`, *optional*, defaults to `"image"`): the `datasets.Image` column (renamed to "image").
        check_images (`str`, *optional*, defaults to `"none"`): "none", "exists" (files of path-backed images
            exist) or "decode" (every image decodes; reads them all).
        on_bad_image (`str`, *optional*, defaults to `"error"`): for an image that fails `check_images` (or whose
            size must be read because `width`/`height` are missing): "error", or "skip" the record (counted).
        split_name (`str`, *optional*): names the split in messages.
        num_proc (`int`, *optional*): processes for `datasets.map`.

    Returns:
        `DetectionSplit` with the converted dataset, `id2label`, `label2category_id` and `stats`. Missing
        annotation ids become `1000 * row index + position`; a missing `image_id` column becomes the row index.

    Raises:
        `ValueError` for an empty split, missing columns (listing the columns found), an unknown category, a
        malformed box, a non-integer or repeated `image_id`, or (with `on_bad_image="error"`) a bad image; each
        names the record (`split[index] (image_id ...)`).
    """
    validate_image_options(check_images, on_bad_image)
    if bbox_format not in BBOX_FORMATS_AUTO:
        raise ValueError(f"`bbox_format` must be one of {BBOX_FORMATS_AUTO}, got {bbox_format!r}.")
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError(
            f"Expected a `datasets.Dataset` (one split), got {type(dataset).__name__}; pick a split, e.g. "
            "`dataset_dict['train']`."
        )
    if len(dataset) == 0:
        raise ValueError(f"Dataset split {split_name!r} is empty.")
    columns = list(dataset.column_names)
    for column, what in ((objects_column, "objects"), (image_column, "image")):
        if column not in columns:
            raise ValueError(
                f"Dataset split {split_name!r} has no {what} column {column!r}; its columns are {columns}."
            )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(
            f"Column {image_column!r} of split {split_name!r} must be a `datasets.Image`, got "
            f"{dataset.features[image_column]}."
        )

    fields = _object_fields(dataset, objects_column)
    bbox_key = _find_key(fields, BBOX_KEYS, "box", objects_column, required=True)
    category_key = _find_key(fields, CATEGORY_KEYS, "category", objects_column, required=True)
    id_key = _find_key(fields, ID_KEYS, "id", objects_column, required=False)
    area_key = _find_key(fields, AREA_KEYS, "area", objects_column, required=False)
    iscrowd_key = _find_key(fields, ISCROWD_KEYS, "iscrowd", objects_column, required=False)
    object_keys = [key for key in (bbox_key, category_key, id_key, area_key, iscrowd_key) if key is not None]

    has_size = "width" in columns and "height" in columns
    has_image_id = "image_id" in columns
    # Images are never decoded by `map`; they are opened here only to check them or to read a missing size.
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    objects_only = dataset.select_columns([objects_column])

    class_feature = fields[category_key]
    class_names = class_feature.names if isinstance(class_feature, datasets.ClassLabel) else None
    seen = None
    if id2label is None and class_names is None:
        seen = [
            _normalise_category(value)
            for row in objects_only[objects_column]
            for value in _as_dict_of_lists(row, [category_key])[category_key]
        ]
    category_to_label, new_id2label, label2category_id = _build_label_map(id2label, class_names, seen)

    if bbox_format == "auto":
        bbox_format = _detect_format(dataset, objects_column, image_column, bbox_key, has_size, split_name)

    input_columns = [objects_column] + [c for c in ("image_id", "width", "height") if c in columns]
    needs_image = check_images != "none" or not has_size
    if needs_image:
        input_columns.append(image_column)

    def convert(*batch_and_indices):
        *column_values, indices = batch_and_indices
        batch = dict(zip(input_columns, column_values))
        out = {"image_id": [], "width": [], "height": [], "objects": [], "_keep": [], "_counts": []}
        for position, index in enumerate(indices):
            image_id = batch["image_id"][position] if has_image_id else index
            record = _record_name(split_name, index, image_id)
            if isinstance(image_id, float) and image_id.is_integer():
                image_id = int(image_id)
            if not isinstance(image_id, (int, np.integer)) or isinstance(image_id, bool):
                raise ValueError(f"{record}: `image_id` must be an integer, got {image_id!r}.")
            counts = dict.fromkeys(STAT_FIELDS, 0)
            width = batch["width"][position] if has_size else None
            height = batch["height"][position] if has_size else None
            try:
                if needs_image:
                    image_value = batch[image_column][position]
                    check_image(image_value, record, check_images)
                    if width is None or height is None:
                        width, height = image_size(image_value, record)
            except ImageReadError as error:
                if on_bad_image == "error":
                    raise
                counts["skipped_missing_images" if error.missing else "skipped_unreadable_images"] = 1
                out["image_id"].append(int(image_id))
                out["width"].append(0)
                out["height"].append(0)
                out["objects"].append({"id": [], "area": [], "bbox": [], "category": [], "iscrowd": []})
                out["_keep"].append(False)
                out["_counts"].append([counts[name] for name in STAT_FIELDS])
                continue
            if width is None or height is None or int(width) < 1 or int(height) < 1:
                raise ValueError(f"{record}: invalid image size width={width!r}, height={height!r}.")
            objects = _as_dict_of_lists(batch[objects_column][position], object_keys)
            cleaned, counts = clean_objects(
                objects[bbox_key],
                objects[category_key],
                int(width),
                int(height),
                bbox_format,
                lambda category: category_to_label[_normalise_category(category)],
                record,
                ids=objects[id_key] if id_key else None,
                areas=objects[area_key] if area_key else None,
                iscrowd=objects[iscrowd_key] if iscrowd_key else None,
                first_id=index * 1000,
            )
            out["image_id"].append(int(image_id))
            out["width"].append(int(width))
            out["height"].append(int(height))
            out["objects"].append(cleaned)
            out["_keep"].append(True)
            out["_counts"].append([counts[name] for name in STAT_FIELDS])
        return out

    features = detection_features(list(new_id2label.values()), image_feature=datasets.Image(decode=False))
    if image_column != "image":
        features[image_column] = features.pop("image")
    features["_keep"] = datasets.Value("bool")
    features["_counts"] = datasets.List(datasets.Value("int64"))
    converted = dataset.map(
        convert,
        batched=True,
        with_indices=True,
        input_columns=input_columns,
        remove_columns=[column for column in columns if column != image_column],
        features=features,
        num_proc=num_proc,
        desc=f"Preparing {split_name}",
    )

    stats = AnnotationStats()
    totals = np.asarray(converted["_counts"], dtype=np.int64).reshape(-1, len(STAT_FIELDS)).sum(axis=0)
    stats.add(dict(zip(STAT_FIELDS, totals.tolist())))
    if stats.skipped_missing_images or stats.skipped_unreadable_images:
        converted = converted.filter(
            lambda keep: keep, input_columns="_keep", desc=f"Skipping bad images ({split_name})"
        )
    converted = converted.remove_columns(["_keep", "_counts"])
    if image_column != "image":
        converted = converted.rename_column(image_column, "image")
    converted = converted.cast_column("image", datasets.Image())
    converted = converted.select_columns(["image", "image_id", "width", "height", "objects"])
    if len(converted) == 0:
        raise ValueError(f"Dataset split {split_name!r} has no usable image left: {stats.to_dict()}.")
    _check_unique_image_ids(converted["image_id"], split_name)

    stats.log_warnings(split_name)
    return DetectionSplit(converted, new_id2label, label2category_id, stats, split_name)


def _detect_format(
    dataset: datasets.Dataset, objects_column: str, image_column: str, bbox_key: str, has_size: bool, split_name: str
) -> str:
    """Detects the box format from up to `_FORMAT_SAMPLE_SIZE` rows spread over the dataset."""
    count = min(len(dataset), _FORMAT_SAMPLE_SIZE)
    indices = np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(int)).tolist()
    sample = dataset.select(indices)
    rows = sample[objects_column]
    boxes = [_as_dict_of_lists(row, [bbox_key])[bbox_key] for row in rows]
    if has_size:
        sizes = list(zip(sample["width"], sample["height"]))
    else:
        sizes = []
        for index, value in zip(indices, sample[image_column]):
            try:
                sizes.append(image_size(value, _record_name(split_name, index, "?")))
            except ImageReadError:
                sizes.append((float("inf"), float("inf")))  # bad images are reported by the conversion
    evidence = collect_bbox_evidence(boxes, sizes)
    bbox_format = detect_bbox_format(evidence, source=f"split {split_name!r}")
    logger.info(f"Split {split_name!r}: detected box format {bbox_format!r} ({evidence}).")
    return bbox_format


def _check_unique_image_ids(image_ids: Sequence[int], split_name: str) -> None:
    repeated = [(image_id, count) for image_id, count in Counter(image_ids).items() if count > 1]
    if repeated:
        examples = ", ".join(f"{image_id} ({count} times)" for image_id, count in repeated[:5])
        raise ValueError(
            f"Dataset split {split_name!r} repeats image ids: {examples}{' ...' if len(repeated) > 5 else ''}. "
            "COCO evaluation needs one record per image id."
        )
