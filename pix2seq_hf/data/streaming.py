"""
Training data read as a stream: a Hub or local dataset opened as a `datasets.IterableDataset`, converted example by
example into the common format (see `schema.py`), shuffled with a buffer, split between the processes of a run and
the DataLoader workers of each process (every image is read by one worker of one process per epoch), with a position
that a checkpoint saves and a resumed run continues from exactly.

The position of a process is, for each of its readers (its DataLoader workers, or the process itself without
workers), how many examples that reader has handed out this epoch, and which reader hands out the next batch. A
resumed run rebuilds the same streams (same seed, same epoch), lets each reader pass over the examples it had handed
out (their rows are read, not decoded) and has the DataLoader start with the reader that was next; so it sees exactly
the images, in the order, that the uninterrupted run would have seen.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import datasets
import torch
from accelerate.utils import gather_object
from datasets.distributed import split_dataset_by_node

from .bbox_format import collect_bbox_evidence, detect_bbox_format
from .hf_datasets import (
    AREA_KEYS,
    BBOX_KEYS,
    CATEGORY_KEYS,
    ID_KEYS,
    ISCROWD_KEYS,
    _as_dict_of_lists,
    _build_label_map,
    _find_key,
    _normalise_category,
    _object_fields,
    prepare_detection_dataset,
)
from .images import image_size
from .schema import clean_objects


logger = logging.getLogger(__name__)

# Examples held by the shuffle buffer of each reader (as rows, images undecoded).
DEFAULT_SHUFFLE_BUFFER_SIZE = 1000
# Streams read from a local `save_to_disk` folder are cut into this many shards (at most one per example), so that
# processes and workers read whole shards rather than every example.
LOCAL_NUM_SHARDS = 64
# Rows looked at, at the head of the stream, to detect the box format.
_FORMAT_SAMPLE_SIZE = 200
# Rows read from a stream at once.
_READ_BATCH_SIZE = 64
# The key each example carries from its reader to the collate function.
_READER_KEY = "_stream_reader"


def _saved_split(name: str, split: str) -> datasets.Dataset | None:
    """
    Split `split` of a folder saved with `save_to_disk` (a `DatasetDict`, or a single dataset standing for "train"),
    or `None` when `name` is no such folder.

    Raises:
        `ValueError` naming the folder and the splits it has when it has no split `split`.
    """
    if not (
        os.path.isdir(name)
        and any(os.path.isfile(os.path.join(name, marker)) for marker in ("dataset_dict.json", "state.json"))
    ):
        return None
    data = datasets.load_from_disk(name)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{name} has no split {split!r}; its splits are {list(data)}.")
        return data[split]
    if split != "train":
        raise ValueError(
            f"{name} holds a single split (read as 'train'); it has no split {split!r}. Save a DatasetDict with "
            "both splits, or pass --validation_split none."
        )
    return data


def open_stream(name: str, config: str | None = None, split: str = "train") -> datasets.IterableDataset:
    """
    One split of a dataset as an `IterableDataset`: a folder saved with `save_to_disk` (read from its memory-mapped
    files, in `LOCAL_NUM_SHARDS` shards), else `datasets.load_dataset(name, config, split=split, streaming=True)` (a
    Hub dataset, a folder of parquet/json/image files, ...).

    Raises:
        `ValueError` when a `save_to_disk` folder has no split `split` (naming the splits it has).
    """
    data = _saved_split(name, split)
    if data is None:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    stream = data.to_iterable_dataset(num_shards=max(1, min(LOCAL_NUM_SHARDS, len(data))))
    stream.info.splits = datasets.SplitDict({split: datasets.SplitInfo(split, num_examples=len(data))})
    return stream


def _rows(stream: datasets.IterableDataset) -> Iterator[dict]:
    """The examples of `stream`, read a batch of rows at a time (in a DataLoader worker too: `stream` is already the
    worker's part, so `datasets` must not split it again, as iterating it directly would)."""
    for batch in stream.iter(batch_size=_READ_BATCH_SIZE):
        columns = list(batch)
        for values in zip(*(batch[column] for column in columns)):
            yield dict(zip(columns, values))


class StreamingDetectionDataset(torch.utils.data.IterableDataset):
    """
    The training examples of a stream, in the common format, for one process of a run.

    Each reader (DataLoader worker, or the process without workers) takes its part of the stream
    (`split_dataset_by_node` over all the readers of all processes), shuffles it with a buffer seeded by `seed` and
    the epoch, and yields its examples with the image undecoded (`{"bytes", "path"}`, decoded by the collator).

    Args:
        stream (`datasets.IterableDataset`): the split, as `open_stream` gives it.
        bbox_format (`str`, *optional*, defaults to `"auto"`): "xywh", "xyxy", or "auto" (detected from the head of
            the stream, see `detect_bbox_format`).
        id2label (`Mapping[int, str]`, *optional*): the dataset's category id -> class name; defaults to the names of
            the `category` ClassLabel (a stream cannot be read through to find its categories).
        rank (`int`, *optional*, defaults to 0), world_size (`int`, *optional*, defaults to 1): this process and the
            number of processes of the run.
        seed (`int`, *optional*, defaults to 0): the seed of the shuffling.
        shuffle_buffer_size (`int`, *optional*, defaults to `DEFAULT_SHUFFLE_BUFFER_SIZE`): examples each reader
            shuffles among.
        split_name (`str`, *optional*, defaults to `"train"`): names the split in messages.

    Attributes:
        id2label (`dict[int, str]`), label2category_id (`dict[int, int]`): the label map of the examples.
        num_examples (`int` or `None`): examples in the whole split, when the dataset says.

    Raises:
        `ValueError` naming the column or field: no `image`, `image_id` or `objects` column, no box or category field,
        no class names.
    """

    def __init__(
        self,
        stream: datasets.IterableDataset,
        bbox_format: str = "auto",
        id2label: Mapping[int, str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
        split_name: str = "train",
    ):
        features = stream.features
        if features is None:
            raise ValueError(f"The stream of split {split_name!r} does not declare its features (columns and types).")
        for column in ("image", "image_id", "objects"):
            if column not in features:
                raise ValueError(
                    f"Split {split_name!r} has no column {column!r}, which a stream needs; its columns are "
                    f"{list(features)}."
                )
        if not isinstance(features["image"], datasets.Image):
            raise ValueError(
                f"Column 'image' of split {split_name!r} must be a `datasets.Image`, got {features['image']}."
            )
        fields = _object_fields(stream, "objects")
        self._keys = {
            "bbox": _find_key(fields, BBOX_KEYS, "box", "objects", required=True),
            "category": _find_key(fields, CATEGORY_KEYS, "category", "objects", required=True),
            "id": _find_key(fields, ID_KEYS, "id", "objects", required=False),
            "area": _find_key(fields, AREA_KEYS, "area", "objects", required=False),
            "iscrowd": _find_key(fields, ISCROWD_KEYS, "iscrowd", "objects", required=False),
        }
        class_feature = fields[self._keys["category"]]
        class_names = class_feature.names if isinstance(class_feature, datasets.ClassLabel) else None
        if id2label is None and class_names is None:
            raise ValueError(
                f"Split {split_name!r}: objects.{self._keys['category']} is not a ClassLabel, so the class names are "
                "unknown; a stream cannot be read through to collect them. Give `id2label`."
            )
        self._category_to_label, self.id2label, self.label2category_id = _build_label_map(id2label, class_names, None)
        self.stream = stream.cast_column("image", datasets.Image(decode=False))
        self.split_name = split_name
        self.has_size = "width" in features and "height" in features
        self.bbox_format = self._detect_format() if bbox_format == "auto" else bbox_format
        split_info = (stream.info.splits or {}).get(split_name) if stream.info is not None else None
        self.num_examples = getattr(split_info, "num_examples", None) or None
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle_buffer_size = seed, shuffle_buffer_size
        # The epoch (the shuffling depends on it) and where the readers of this process start in it: examples to pass
        # over per reader, and the reader of the first batch (set by `StreamingDataLoader`).
        self.epoch = 0
        self.start = {"consumed": None, "next_reader": 0}

    def _detect_format(self) -> str:
        boxes, sizes = [], []
        for row in itertools.islice(_rows(self.stream), _FORMAT_SAMPLE_SIZE):
            boxes.append(_as_dict_of_lists(row["objects"], [self._keys["bbox"]])[self._keys["bbox"]])
            sizes.append(self._size(row))
        evidence = collect_bbox_evidence(boxes, sizes)
        bbox_format = detect_bbox_format(evidence, source=f"split {self.split_name!r} (first {len(boxes)} examples)")
        logger.info(f"Split {self.split_name!r}: detected box format {bbox_format!r} ({evidence}).")
        return bbox_format

    def _size(self, row: Mapping) -> tuple[int, int]:
        if self.has_size and row["width"] is not None and row["height"] is not None:
            return int(row["width"]), int(row["height"])
        return image_size(row["image"], f"{self.split_name} (image_id {row['image_id']})")

    def convert(self, row: Mapping) -> dict:
        """One row of the stream in the common format (image undecoded), its boxes cleaned by `clean_objects`."""
        image_id = row["image_id"]
        record = f"{self.split_name} (image_id {image_id})"
        if isinstance(image_id, float) and image_id.is_integer():
            image_id = int(image_id)
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise ValueError(f"{record}: `image_id` must be an integer, got {image_id!r}.")
        width, height = self._size(row)
        keys = [key for key in self._keys.values() if key is not None]
        objects = _as_dict_of_lists(row["objects"], keys)
        cleaned, _ = clean_objects(
            objects[self._keys["bbox"]],
            objects[self._keys["category"]],
            width,
            height,
            self.bbox_format,
            lambda category: self._category_to_label[_normalise_category(category)],
            record,
            ids=objects[self._keys["id"]] if self._keys["id"] else None,
            areas=objects[self._keys["area"]] if self._keys["area"] else None,
            iscrowd=objects[self._keys["iscrowd"]] if self._keys["iscrowd"] else None,
            first_id=image_id * 1000,
        )
        return {"image": row["image"], "image_id": image_id, "width": width, "height": height, "objects": cleaned}

    def reader_stream(self, reader: int, num_readers: int) -> Iterator[dict]:
        """The examples reader `reader` of this process's `num_readers` yields this epoch, in the common format."""
        part = split_dataset_by_node(
            self.stream, rank=self.rank * num_readers + reader, world_size=self.world_size * num_readers
        )
        part = part.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        part.set_epoch(self.epoch)
        consumed = self.start["consumed"]
        skip = consumed[reader] if consumed is not None else 0
        for row in itertools.islice(_rows(part), skip, None):
            yield self.convert(row)

    def __iter__(self) -> Iterator[dict]:
        worker = torch.utils.data.get_worker_info()
        num_readers = worker.num_workers if worker is not None else 1
        # The DataLoader asks its workers for batches in turn from worker 0: worker 0 plays the reader that was next.
        reader = ((worker.id if worker is not None else 0) + self.start["next_reader"]) % num_readers
        for example in self.reader_stream(reader, num_readers):
            example[_READER_KEY] = reader
            yield example


class _CollateWithReader:
    """Collates with `collate_fn` and notes which reader the examples came from and how many there were."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, examples: list[dict]) -> dict:
        reader = examples[0][_READER_KEY]
        batch = self.collate_fn(examples)
        batch[_READER_KEY] = (reader, len(examples))
        return batch


class StreamingDataLoader:
    """
    A DataLoader over a `StreamingDetectionDataset` that keeps the position of its process in the stream, saved and
    restored with the training state (register it with `accelerator.register_for_checkpointing`).

    It is not prepared by Accelerate (each process already reads its own part of the stream): batches are moved to
    `device` here.

    Args:
        dataset (`StreamingDetectionDataset`): the stream of this process.
        batch_size (`int`): examples per batch.
        collate_fn (`Callable`): makes a batch of examples (e.g. `Pix2SeqCollator`).
        num_workers (`int`, *optional*, defaults to 0): DataLoader workers (each reads its own part of the stream).
        device (`torch.device`, *optional*): where the batches' tensors go.
    """

    def __init__(
        self,
        dataset: StreamingDetectionDataset,
        batch_size: int,
        collate_fn: Callable,
        num_workers: int = 0,
        device: torch.device | None = None,
    ):
        self.dataset = dataset
        self.num_readers = max(1, num_workers)
        self.device = device
        self.consumed = [0] * self.num_readers
        self.next_reader = 0
        self._loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, collate_fn=_CollateWithReader(collate_fn), num_workers=num_workers
        )

    def set_epoch(self, epoch: int) -> None:
        """Call before iterating each epoch (after `load_state_dict` when resuming)."""
        if epoch != self.dataset.epoch:
            self.consumed, self.next_reader = [0] * self.num_readers, 0
        self.dataset.epoch = epoch

    def __iter__(self) -> Iterator[dict]:
        self.dataset.start = {"consumed": list(self.consumed), "next_reader": self.next_reader}
        for batch in self._loader:
            reader, count = batch.pop(_READER_KEY)
            self.consumed[reader] += count
            self.next_reader = (reader + 1) % self.num_readers
            if self.device is not None:
                batch = {
                    name: value.to(self.device) if torch.is_tensor(value) else value for name, value in batch.items()
                }
            yield batch

    def position(self) -> dict[str, Any]:
        """This process's position: `epoch`, examples handed out by each reader this epoch, the next reader."""
        return {"epoch": self.dataset.epoch, "consumed": list(self.consumed), "next_reader": self.next_reader}

    def state_dict(self) -> dict[str, Any]:
        """The positions of all processes (gathered: call it on every process, as `accelerator.save_state` does)."""
        return {"positions": gather_object([self.position()])}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """
        Takes this process's position from `state_dict()`'s result.

        Raises:
            `ValueError` when the state was saved by another number of processes or of DataLoader workers.
        """
        positions = state["positions"]
        if len(positions) != self.dataset.world_size:
            raise ValueError(
                f"The stream position was saved by {len(positions)} processes; this run has {self.dataset.world_size}."
            )
        position = positions[self.dataset.rank]
        if len(position["consumed"]) != self.num_readers:
            saved = len(position["consumed"])
            raise ValueError(
                f"The stream position was saved with {saved} reader(s) per process (DataLoader workers, or 1 without "
                f"workers); this run has {self.num_readers}: resume with the same number of DataLoader workers."
            )
        self.dataset.epoch = position["epoch"]
        self.consumed, self.next_reader = list(position["consumed"]), position["next_reader"]


def load_streaming_splits(
    dataset_name: str,
    dataset_config: str | None = None,
    train_split: str = "train",
    validation_split: str | None = "validation",
    bbox_format: str = "auto",
    max_eval_samples: int | None = None,
    check_images: str = "none",
    on_bad_image: str = "error",
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    shuffle_buffer_size: int = DEFAULT_SHUFFLE_BUFFER_SIZE,
) -> tuple[StreamingDetectionDataset, datasets.Dataset | None]:
    """
    The training split of `dataset_name` as a stream (`StreamingDetectionDataset`) and its validation split read
    whole (`prepare_detection_dataset`, with the training split's labels), as `load_detection_splits` reads it.

    Returns:
        `(train, validation)`: `validation` is `None` for `validation_split` "none" or `None`.
    """
    train = StreamingDetectionDataset(
        open_stream(dataset_name, dataset_config, train_split),
        bbox_format=bbox_format,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle_buffer_size=shuffle_buffer_size,
        split_name=train_split,
    )
    if validation_split is None or str(validation_split).lower() == "none":
        return train, None
    data = _saved_split(dataset_name, validation_split)
    if data is None:
        data = datasets.load_dataset(dataset_name, dataset_config, split=validation_split)
    if max_eval_samples is not None:
        data = data.select(range(min(max_eval_samples, len(data))))
    category_names = {train.label2category_id[label]: name for label, name in train.id2label.items()}
    validation = prepare_detection_dataset(
        data,
        bbox_format=bbox_format,
        id2label=category_names,
        check_images=check_images,
        on_bad_image=on_bad_image,
        split_name=validation_split,
    )
    return train, validation.dataset
