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
from collections.abc import Iterator, Mapping

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .annotation_cache import annotation_cache_key, cached_split
from .images import ImageReadError, check_image, image_size, validate_image_options
from .json_stream import NotAnObjectError, iter_json_object
from .schema import AnnotationStats, DetectionSplit, detection_features, unique_label_names


logger = logging.getLogger(__name__)


# Records decoded and checked at once while the json is read, and images written to the split per Arrow record batch.
_RECORDS_PER_CHUNK = 50_000
_IMAGES_PER_BATCH = 50_000
# The `annotations` records as checked columns, kept on disk between reading the json and writing the split.
_SPILL_SCHEMA = pa.schema(
    [
        ("image_id", pa.int64()),
        ("category_id", pa.int64()),
        ("bbox", pa.list_(pa.float64(), 4)),
        ("id", pa.int64()),
        ("has_id", pa.bool_()),
        ("area", pa.float64()),
        ("iscrowd", pa.int64()),
    ]
)


class _JsonContent:
    """
    What one pass over a COCO json keeps: the categories (as records), the images (as checked columns), the
    annotations (as checked columns in an Arrow file of `scratch_dir`), and the first bad image or annotation record.
    """

    def __init__(self, annotation_file: str, scratch_dir: str):
        self.annotation_file = annotation_file
        self.keys: dict[str, object] = {}  # each top-level key, and its value when it is not an array
        self.categories: list = []
        self.image_chunks: list[dict] = []
        self.num_images = 0
        self.image_error: ValueError | None = None
        self.spill_file = os.path.join(scratch_dir, "annotations.arrow")
        self._spill = None
        self.num_annotations = 0
        # (position, record) of the first annotation whose fields have a wrong type.
        self.bad_annotation: tuple[int, object] | None = None

    def add(self, key: str, value, start: int | None) -> None:
        """Takes one member, or one chunk of an array member, from `iter_json_object`."""
        if start in (None, 0):
            if key in self.keys and key in ("images", "annotations", "categories"):
                raise ValueError(f"COCO annotation file {self.annotation_file!r} has the key {key!r} twice.")
            self.keys[key] = value if start is None else []
        if start is None:
            return
        if key == "categories":
            self.categories.extend(value)
        elif key == "images":
            self.num_images += len(value)
            if self.image_error is None:
                try:
                    self.image_chunks.append(_image_columns(value, self.annotation_file, start))
                except ValueError as error:
                    self.image_error = error
        elif key == "annotations" and self.bad_annotation is None:
            columns, bad = _annotation_columns(value, self.annotation_file, start)
            self._write_annotations(columns)
            if bad is not None:
                self.bad_annotation = (start + bad, value[bad])

    def _write_annotations(self, columns: dict) -> None:
        if self._spill is None:
            self._spill = pa.ipc.new_file(self.spill_file, _SPILL_SCHEMA)
        bbox = pa.FixedSizeListArray.from_arrays(pa.array(columns["bbox"].ravel(), type=pa.float64()), 4)
        arrays = [bbox if name == "bbox" else pa.array(columns[name]) for name in _SPILL_SCHEMA.names]
        self._spill.write_batch(pa.record_batch(arrays, schema=_SPILL_SCHEMA))
        self.num_annotations += len(columns["image_id"])

    def close(self) -> None:
        if self._spill is None:
            self._write_annotations(_annotation_columns([], self.annotation_file, 0)[0])
        self._spill.close()

    def annotation_batches(self) -> Iterator[tuple[int, pa.RecordBatch]]:
        """The checked annotation columns, a record batch at a time (read, not mapped): `(position, batch)`."""
        with pa.OSFile(self.spill_file) as source:
            reader = pa.ipc.open_file(source)
            position = 0
            for index in range(reader.num_record_batches):
                batch = reader.get_batch(index)
                yield position, batch
                position += batch.num_rows


def _read_json(annotation_file: str, scratch_dir: str) -> _JsonContent:
    """
    Reads the json in one pass, a chunk of records at a time (memory: one chunk and the columns, not the parsed
    file), checking each record's fields as it goes.

    Raises:
        `ValueError` for a file that is not valid JSON, is not an object, or lacks the lists `images` and
        `categories`. Errors in the records are kept in the result, to be raised in the order the split checks them.
    """
    content = _JsonContent(annotation_file, scratch_dir)
    try:
        for key, value, start in iter_json_object(annotation_file, _RECORDS_PER_CHUNK):
            content.add(key, value, start)
    except json.JSONDecodeError as error:
        raise ValueError(f"COCO annotation file {annotation_file!r} is not valid JSON: {error}") from None
    except NotAnObjectError as error:
        raise ValueError(
            f"COCO annotation file {annotation_file!r} must hold a JSON object, got {error.type_name}."
        ) from None
    content.close()
    for key in ("images", "categories", "annotations"):
        if not isinstance(content.keys.get(key), list) and (key != "annotations" or content.keys.get(key) is not None):
            raise ValueError(
                f"COCO annotation file {annotation_file!r} needs a list {key!r}; its keys are {sorted(content.keys)}."
            )
    return content


def _annotation_record(annotation_file: str, position: int):
    """The `annotations` record at `position`, read again from the json (to name it in an error)."""
    for key, value, start in iter_json_object(annotation_file, _RECORDS_PER_CHUNK):
        if key == "annotations" and start is not None and start <= position < start + len(value):
            return value[position - start]
    raise AssertionError(f"{annotation_file} has no annotation at position {position}")


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


class _NotClean(Exception):
    """A column that the vectorised checks cannot accept; the per-record checks then find and name the record."""


def _integer_column(values: list, optional: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """
    The json values of one integer field as `(int64 array, present mask)`, or `_NotClean` when any value is not an
    integer (`3` or `3.0`, not a bool), or is missing and not `optional`.
    """
    try:
        array = pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError):
        raise _NotClean from None
    present = ~np.asarray(array.is_null(), dtype=bool)
    if not optional and not present.all():
        raise _NotClean
    if pa.types.is_null(array.type):
        return np.zeros(len(values), dtype=np.int64), present
    if pa.types.is_integer(array.type):
        return array.fill_null(0).to_numpy().astype(np.int64), present
    if pa.types.is_floating(array.type):
        numbers = array.fill_null(0).to_numpy()
        if not (np.isfinite(numbers) & (numbers == np.round(numbers)) & (np.abs(numbers) < 2**62)).all():
            raise _NotClean
        return numbers.astype(np.int64), present
    raise _NotClean


def _number_column(values: list) -> np.ndarray:
    """The json values of one optional number field as float64 (NaN where missing), or `_NotClean`."""
    try:
        array = pa.array(values)
    except (pa.ArrowException, OverflowError, TypeError):
        raise _NotClean from None
    if pa.types.is_null(array.type):
        return np.full(len(values), np.nan)
    if not (pa.types.is_integer(array.type) or pa.types.is_floating(array.type)):
        raise _NotClean
    return array.cast(pa.float64()).fill_null(np.nan).to_numpy()


def _checked_image(image, position: int, annotation_file: str) -> tuple[int, str, int | None, int | None]:
    """One `images` record checked: `(id, file_name, width, height)`, `ValueError` naming record, field and value."""
    where = f"{annotation_file}: images[{position}]"
    _fields(image, ("id", "file_name"), where)
    image_id = _integer(image["id"], where, "id")
    where = f"{where} (image_id {image_id})"
    file_name = _text(image["file_name"], where, "file_name")
    width, height = (
        None if image.get(key) is None else _integer(image[key], where, key, minimum=1) for key in ("width", "height")
    )
    return image_id, file_name, width, height


def _image_columns(images: list, annotation_file: str, start: int = 0) -> dict:
    """
    The `images` records (the json's from position `start` on) as columns: `id` (int64), `file_name` (list of str),
    `width` / `height` (int64, 0 where the json has none). Checked column by column; a bad record is named as by
    `_checked_image`.
    """
    try:
        ids, _ = _integer_column([image["id"] for image in images])
        file_names = pa.array([image["file_name"] for image in images])
        if not pa.types.is_string(file_names.type) or file_names.null_count:
            raise _NotClean
        if len(images) and pc.min(pc.utf8_length(file_names)).as_py() == 0:
            raise _NotClean
        sizes = {}
        for key in ("width", "height"):
            values, present = _integer_column([image.get(key) for image in images], optional=True)
            if (present & (values < 1)).any():
                raise _NotClean
            sizes[key] = np.where(present, values, 0)
        columns = {"id": ids, "file_name": file_names.to_pylist(), **sizes}
    except (_NotClean, KeyError, TypeError, AttributeError, OverflowError, pa.ArrowException):
        # A record the columns cannot hold: check record by record, which names the first bad one.
        entries = [_checked_image(image, start + offset, annotation_file) for offset, image in enumerate(images)]
        columns = {
            "id": np.array([entry[0] for entry in entries], dtype=np.int64),
            "file_name": [entry[1] for entry in entries],
            "width": np.array([entry[2] or 0 for entry in entries], dtype=np.int64),
            "height": np.array([entry[3] or 0 for entry in entries], dtype=np.int64),
        }
    return columns


def _checked_annotation(
    annotation, position: int, annotation_file: str, image_ids=None, category_to_label: Mapping[int, int] | None = None
) -> tuple[int, int, list[float], int | None, float | None, int]:
    """
    One `annotations` record checked: `(image_id, category_id, bbox, id, area, iscrowd)`, or a `ValueError` naming
    the file, the annotation (its id, else its position) and the bad value. Its image and category are looked up in
    `image_ids` and `category_to_label` when they are given.
    """
    annotation_id = annotation.get("id", f"#{position}") if isinstance(annotation, Mapping) else f"#{position}"
    where = f"{annotation_file}: annotation {annotation_id}"
    _fields(annotation, ("image_id", "bbox", "category_id"), where)
    image_id = _integer(annotation["image_id"], where, "image_id")
    if image_ids is not None and image_id not in image_ids:
        raise ValueError(f"{where} refers to image_id {image_id}, which is not in 'images'.")
    where = f"{where} (image_id {image_id})"
    category_id = _integer(annotation["category_id"], where, "category_id")
    if category_to_label is not None and category_id not in category_to_label:
        known = sorted(category_to_label)
        raise ValueError(
            f"{where} has category_id {category_id}, which is not in the label map (category ids "
            f"{known[:20]}{' ...' if len(known) > 20 else ''})."
        )
    bbox = annotation["bbox"]
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        raise ValueError(f"{where}: bbox must be a list of 4 numbers [x, y, width, height], got {bbox!r}.")
    return (
        image_id,
        category_id,
        [_number(value, where, "bbox") for value in bbox],
        _integer(annotation["id"], where, "id") if annotation.get("id") is not None else None,
        _number(annotation["area"], where, "area") if annotation.get("area") is not None else None,
        _integer(annotation.get("iscrowd") or 0, where, "iscrowd"),
    )


def _annotation_columns(annotations: list, annotation_file: str, start: int) -> tuple[dict, int | None]:
    """
    The `annotations` records (the json's from position `start` on) as columns: `image_id`, `category_id`, `id`
    (int64), `has_id` (bool), `bbox` (float64, n x 4), `area` (float64, NaN where missing), `iscrowd` (int64),
    checked column by column (their image and category are looked up later, once every image and category is known).

    Returns:
        `(columns, bad)`: `bad` is the index in `annotations` of the first record with a wrong field (checked record
        by record when a column is off), and the columns then hold the records before it; else `None`.
    """
    try:
        image_column, _ = _integer_column([annotation["image_id"] for annotation in annotations])
        category_column, _ = _integer_column([annotation["category_id"] for annotation in annotations])
        boxes = pa.array([annotation["bbox"] for annotation in annotations])
        if not pa.types.is_list(boxes.type) or boxes.null_count:
            raise _NotClean
        if len(annotations) and (pc.list_value_length(boxes).to_numpy() != 4).any():
            raise _NotClean
        values = boxes.flatten()
        if values.null_count or not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
            if len(values):
                raise _NotClean
        bbox = values.cast(pa.float64()).to_numpy().reshape(-1, 4)
        ids, has_id = _integer_column([annotation.get("id") for annotation in annotations], optional=True)
        area = _number_column([annotation.get("area") for annotation in annotations])
        iscrowd, _ = _integer_column([annotation.get("iscrowd") or 0 for annotation in annotations])
        columns = {
            "image_id": image_column,
            "category_id": category_column,
            "bbox": bbox,
            "id": ids,
            "has_id": has_id,
            "area": area,
            "iscrowd": iscrowd,
        }
        return columns, None
    except (_NotClean, KeyError, TypeError, AttributeError, OverflowError, pa.ArrowException):
        entries, bad = [], None
        for offset, annotation in enumerate(annotations):
            try:
                entries.append(_checked_annotation(annotation, start + offset, annotation_file))
            except ValueError:
                bad = offset
                break
        columns = {
            "image_id": np.array([entry[0] for entry in entries], dtype=np.int64),
            "category_id": np.array([entry[1] for entry in entries], dtype=np.int64),
            "bbox": np.array([entry[2] for entry in entries], dtype=np.float64).reshape(-1, 4),
            "id": np.array([entry[3] or 0 for entry in entries], dtype=np.int64),
            "has_id": np.array([entry[3] is not None for entry in entries], dtype=bool),
            "area": np.array([np.nan if entry[4] is None else entry[4] for entry in entries], dtype=np.float64),
            "iscrowd": np.array([entry[5] for entry in entries], dtype=np.int64),
        }
        return columns, bad


def _first_unknown(values: np.ndarray, known: np.ndarray) -> int | None:
    """The index of the first of `values` that is not in `known` (sorted), or `None`."""
    where = np.searchsorted(known, values).clip(max=max(len(known) - 1, 0))
    unknown = np.flatnonzero(known[where] != values) if len(known) else np.arange(len(values))
    return int(unknown[0]) if len(unknown) else None


def _check_annotation_references(content: _JsonContent, image_ids: np.ndarray, category_to_label) -> None:
    """
    Raises the error of the first annotation (in json order) that refers to an unknown image or category, or whose
    fields were found wrong while reading, as the per-record checks name it.
    """
    known_images = np.sort(image_ids)
    known_categories = np.array(sorted(category_to_label), dtype=np.int64)
    first_bad = content.bad_annotation[0] if content.bad_annotation is not None else None
    for position, batch in content.annotation_batches():
        unknown = [
            _first_unknown(batch.column(name).to_numpy(), known)
            for name, known in (("image_id", known_images), ("category_id", known_categories))
        ]
        unknown = [position + index for index in unknown if index is not None]
        if unknown:
            first_bad = min(unknown)
            break
    if first_bad is None:
        return
    if content.bad_annotation is not None and first_bad == content.bad_annotation[0]:
        record = content.bad_annotation[1]
    else:
        record = _annotation_record(content.annotation_file, first_bad)
    _checked_annotation(record, first_bad, content.annotation_file, set(image_ids.tolist()), category_to_label)
    raise AssertionError("the per-record checks accepted an annotation that the columns reject")


def _clean_boxes(bbox: np.ndarray, width: np.ndarray, height: np.ndarray, area: np.ndarray) -> dict:
    """
    `clean_objects`' rules over all boxes at once: xywh boxes clipped to their image (`width`, `height` per box);
    non-finite, empty (zero or negative size) and outside (no area once clipped) boxes flagged for dropping; a given
    area kept (no larger than a clipped box), the box's area otherwise.

    Returns:
        `dict` with `bbox` (clipped xywh), `area`, `keep`, and the masks `nonfinite`, `empty`, `outside`, `clipped`.
    """
    finite = np.isfinite(bbox).all(axis=1)
    xyxy = np.where(finite[:, None], bbox, 0.0)
    xyxy[:, 2:] += xyxy[:, :2]
    empty = (xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])
    limits = np.stack([width, height, width, height], axis=1).astype(np.float64)
    clipped = np.clip(xyxy, 0.0, limits)
    outside = (clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1])
    changed = (clipped != xyxy).any(axis=1)
    clipped[:, 2:] -= clipped[:, :2]
    box_area = clipped[:, 2] * clipped[:, 3]
    given = np.isfinite(area) & (area > 0)
    area = np.where(given, np.where(changed, np.minimum(area, box_area), area), box_area)
    return {
        "bbox": clipped,
        "area": area,
        "keep": finite & ~empty & ~outside,
        "nonfinite": ~finite,
        "empty": finite & empty,
        "outside": finite & ~empty & outside,
        "clipped": finite & ~empty & ~outside & changed,
    }


def _image_paths_and_sizes(
    columns: dict, annotation_file: str, image_dir: str, check_images: str, on_bad_image: str, stats: AnnotationStats
) -> tuple[np.ndarray, list[str]]:
    """
    Each image's absolute path, checked as `check_images` asks, and its size read from the file when the json has
    none (`columns["width"]` / `["height"]` are filled in place).

    Returns:
        `(keep, paths)`: which images are kept (a bad image is skipped with `on_bad_image="skip"`, counted in `stats`)
        and the paths of every image.
    """
    paths = [os.path.abspath(os.path.join(image_dir, file_name)) for file_name in columns["file_name"]]
    keep = np.ones(len(paths), dtype=bool)
    missing_size = (columns["width"] == 0) | (columns["height"] == 0)
    rows = range(len(paths)) if check_images != "none" else np.flatnonzero(missing_size).tolist()
    for row in rows:
        record = f"{annotation_file}: image_id {int(columns['id'][row])} ({columns['file_name'][row]})"
        try:
            check_image(paths[row], record, check_images)
            if missing_size[row]:
                # As shown: EXIF orientation applied, as when decoded.
                columns["width"][row], columns["height"][row] = image_size(paths[row], record)
        except ImageReadError as error:
            if on_bad_image == "error":
                raise
            stats.add({"skipped_missing_images" if error.missing else "skipped_unreadable_images": 1})
            keep[row] = False
    return keep, paths


def _list_array(offsets: pa.Array, values: pa.Array) -> pa.ListArray:
    return pa.ListArray.from_arrays(offsets, values)


class _KeptObjects:
    """
    The annotations kept for the split, cleaned, in compact columns filled a batch at a time: `row` (their image's
    row in `images`), `id`, `bbox` (clipped xywh, float32), `area` (float32), `label` and `crowd`.
    """

    def __init__(self, capacity: int):
        self.size = 0
        self.row = np.empty(capacity, dtype=np.int64)
        self.id = np.empty(capacity, dtype=np.int64)
        self.bbox = np.empty((capacity, 4), dtype=np.float32)
        self.area = np.empty(capacity, dtype=np.float32)
        self.label = np.empty(capacity, dtype=np.int64)
        self.crowd = np.empty(capacity, dtype=np.int8)

    def add(self, keep: np.ndarray, **columns: np.ndarray) -> None:
        count = int(keep.sum())
        for name, values in columns.items():
            getattr(self, name)[self.size : self.size + count] = values[keep]
        self.size += count


def _clean_annotations(
    content: _JsonContent, images: dict, keep_image: np.ndarray, category_to_label, stats: AnnotationStats
) -> _KeptObjects:
    """
    Every annotation looked up (its image's row, its label), given an id when the json has none (`image_id * 1000 +`
    its position among its image's annotations), cleaned by `_clean_boxes`; counts what is dropped in `stats`.
    """
    order = np.argsort(images["id"], kind="stable")
    sorted_ids = images["id"][order]
    lookup_ids = np.array(sorted(category_to_label), dtype=np.int64)
    lookup_labels = np.array([category_to_label[c] for c in lookup_ids.tolist()], dtype=np.int64)
    seen_per_image = np.zeros(len(images["id"]), dtype=np.int64)
    kept = _KeptObjects(content.num_annotations)
    for _, batch in content.annotation_batches():
        image_id = batch.column("image_id").to_numpy()
        row = order[np.searchsorted(sorted_ids, image_id)]
        # The position of each annotation among its image's, in json order (counting those of earlier batches).
        by_image = np.argsort(row, kind="stable")
        grouped = row[by_image]
        position_in_image = np.empty_like(row)
        position_in_image[by_image] = np.arange(len(row)) - np.searchsorted(grouped, grouped, side="left")
        position_in_image += seen_per_image[row]
        seen_per_image += np.bincount(row, minlength=len(seen_per_image))
        has_id = batch.column("has_id").to_numpy(zero_copy_only=False)
        ids = np.where(has_id, batch.column("id").to_numpy(), image_id * 1000 + position_in_image)

        bbox = batch.column("bbox").flatten().to_numpy().reshape(-1, 4)
        area = batch.column("area").to_numpy(zero_copy_only=False)
        cleaned = _clean_boxes(bbox, images["width"][row], images["height"][row], area)
        counted = keep_image[row]
        stats.add(
            {
                "dropped_nonfinite_boxes": (cleaned["nonfinite"] & counted).sum(),
                "dropped_empty_boxes": (cleaned["empty"] & counted).sum(),
                "dropped_outside_boxes": (cleaned["outside"] & counted).sum(),
                "clipped_boxes": (cleaned["clipped"] & counted).sum(),
            }
        )
        labels = lookup_labels[np.searchsorted(lookup_ids, batch.column("category_id").to_numpy())]
        kept.add(
            cleaned["keep"] & counted,
            row=row,
            id=ids,
            bbox=cleaned["bbox"].astype(np.float32),
            area=cleaned["area"].astype(np.float32),
            label=labels,
            crowd=(batch.column("iscrowd").to_numpy() != 0).astype(np.int8),
        )
    return kept


def _split_tables(
    images: dict, paths: list[str], keep_image: np.ndarray, kept: _KeptObjects, features: datasets.Features
) -> Iterator[pa.Table]:
    """The split's rows, `_IMAGES_PER_BATCH` kept images at a time, each with its objects in json order."""
    kept_rows = np.flatnonzero(keep_image)
    new_row = np.cumsum(keep_image) - 1
    objects_per_image = np.bincount(new_row[kept.row[: kept.size]], minlength=len(kept_rows))
    first_object = np.concatenate([[0], np.cumsum(objects_per_image)])
    by_image = np.argsort(kept.row[: kept.size], kind="stable")
    for begin in range(0, len(kept_rows), _IMAGES_PER_BATCH):
        rows = kept_rows[begin : begin + _IMAGES_PER_BATCH]
        bounds = first_object[begin : begin + len(rows) + 1]
        taken = by_image[bounds[0] : bounds[-1]]
        offsets = pa.array(bounds - bounds[0], type=pa.int32())
        boxes = pa.FixedSizeListArray.from_arrays(pa.array(kept.bbox[taken].ravel()), 4)
        objects = pa.StructArray.from_arrays(
            [
                _list_array(offsets, pa.array(kept.id[taken], type=pa.int64())),
                _list_array(offsets, pa.array(kept.area[taken])),
                _list_array(offsets, boxes),
                _list_array(offsets, pa.array(kept.label[taken], type=pa.int64())),
                _list_array(offsets, pa.array(kept.crowd[taken], type=pa.int8())),
            ],
            names=["id", "area", "bbox", "category", "iscrowd"],
        )
        image_column = pa.StructArray.from_arrays(
            [pa.nulls(len(rows), pa.binary()), pa.array([paths[i] for i in rows.tolist()], type=pa.string())],
            names=["bytes", "path"],
        )
        yield pa.table(
            {
                "image": image_column,
                "image_id": pa.array(images["id"][rows], type=pa.int64()),
                "width": pa.array(images["width"][rows], type=pa.int32()),
                "height": pa.array(images["height"][rows], type=pa.int32()),
                "objects": objects,
            }
        ).cast(features.arrow_schema)


def _build_split(
    annotation_file: str,
    image_dir: str,
    check_images: str,
    on_bad_image: str,
    label2category_id: Mapping[int, int] | None,
    split_name: str,
    scratch_dir: str,
) -> tuple[Iterator[pa.Table], datasets.Features, dict, dict, AnnotationStats]:
    """
    Reads and checks the json once (see `load_coco_detection`); its memory is that of the image and kept-annotation
    columns, not of the parsed json. `scratch_dir` holds the annotations between the read and the write.

    Returns:
        `(tables, features, id2label, label2category_id, stats)`, `tables` the split's rows in Arrow tables.
    """
    content = _read_json(annotation_file, scratch_dir)

    names_by_id: dict[int, str] = {}
    for position, category in enumerate(content.categories):
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
    category_to_label = {category_id: label for label, category_id in label2category_id.items()}
    category_ids = [label2category_id[label] for label in range(len(label2category_id))]
    label_names = unique_label_names([names_by_id.get(c, str(c)) for c in category_ids], category_ids)
    id2label = dict(enumerate(label_names))

    if not content.num_images:
        raise ValueError(f"{annotation_file}: 'images' is empty, so the split {split_name!r} has no examples.")
    if content.image_error is not None:
        raise content.image_error
    images = {
        name: np.concatenate([chunk[name] for chunk in content.image_chunks]) for name in ("id", "width", "height")
    }
    images["file_name"] = [name for chunk in content.image_chunks for name in chunk["file_name"]]
    content.image_chunks.clear()
    unique, counts = np.unique(images["id"], return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"{annotation_file}: image id {int(unique[counts > 1][0])} appears twice in 'images'.")
    if "annotations" not in content.keys:
        logger.warning(f"{annotation_file} has no 'annotations': every image of {split_name!r} has no objects.")
    _check_annotation_references(content, images["id"], category_to_label)

    stats = AnnotationStats()
    keep_image, paths = _image_paths_and_sizes(images, annotation_file, image_dir, check_images, on_bad_image, stats)
    kept = _clean_annotations(content, images, keep_image, category_to_label, stats)
    kept_rows = np.flatnonzero(keep_image)
    if not len(kept_rows):
        raise ValueError(f"{annotation_file}: no usable image left in split {split_name!r}: {stats.to_dict()}.")
    objects_per_image = np.bincount(kept.row[: kept.size], minlength=len(keep_image))[kept_rows]
    stats.add(
        {
            "images": len(kept_rows),
            "objects": kept.size,
            "crowd_objects": int(kept.crowd[: kept.size].sum()),
            "images_without_objects": int((objects_per_image == 0).sum()),
        }
    )
    features = detection_features(label_names)
    tables = _split_tables(images, paths, keep_image, kept, features)
    return tables, features, id2label, dict(label2category_id), stats


def load_coco_detection(
    annotation_file: str | os.PathLike,
    image_dir: str | os.PathLike,
    check_images: str = "exists",
    on_bad_image: str = "error",
    label2category_id: Mapping[int, int] | None = None,
    split_name: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> DetectionSplit:
    """
    Reads a COCO detection json and its image folder into the common example format.

    The json is read and checked once: the split is written as an Arrow file to `cache_dir`, under a name made of a
    hash of the json's bytes and of the other arguments, and memory-mapped from there. Every later call with the
    same json and arguments (the other processes of a run, the next runs) maps that file: its start-up costs a read
    of the json to hash it, not a parse, and its resident memory does not grow with the number of annotations.
    Processes that call it together wait for the first to finish building. Images are checked (`check_images`)
    when the split is built; an image that goes missing later fails when it is read.

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
        cache_dir (`str` or `os.PathLike`, *optional*): where prepared splits are kept (defaults to
            `pix2seq_annotations` in the `datasets` cache, `HF_DATASETS_CACHE`). Share it between the processes of
            a machine.

    Returns:
        `DetectionSplit` with the dataset (image paths, lazily decoded; memory-mapped), `id2label` from the json
        category names, `label2category_id` and `stats`.

    Raises:
        `FileNotFoundError` for a missing json or image folder; `ValueError` for malformed json, no images, a
        repeated image id, an annotation of an unknown image or category, a malformed box, or (with
        `on_bad_image="error"`) a missing or unreadable image. Each names the file and the image/annotation id.
    """
    validate_image_options(check_images, on_bad_image)
    annotation_file, image_dir = os.fspath(annotation_file), os.fspath(image_dir)
    split_name = split_name or os.path.basename(annotation_file)
    if not os.path.isfile(annotation_file):
        raise FileNotFoundError(f"COCO annotation file {annotation_file!r} does not exist.")
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"Image folder {image_dir!r} (for {annotation_file!r}) does not exist.")
    if label2category_id is not None:
        label2category_id = {int(label): int(category_id) for label, category_id in label2category_id.items()}
        if sorted(label2category_id) != list(range(len(label2category_id))):
            raise ValueError(
                f"`label2category_id` must have the labels 0..n-1 as keys, got {sorted(label2category_id)}."
            )
    options = {
        "image_dir": os.path.abspath(image_dir),
        "check_images": check_images,
        "on_bad_image": on_bad_image,
        "label2category_id": sorted(label2category_id.items()) if label2category_id is not None else None,
    }
    split = cached_split(
        annotation_cache_key(annotation_file, options),
        lambda scratch_dir: _build_split(
            annotation_file, image_dir, check_images, on_bad_image, label2category_id, split_name, scratch_dir
        ),
        cache_dir,
        split_name,
    )
    split.stats.log_warnings(split_name)
    return split
