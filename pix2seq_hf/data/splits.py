"""Loading the train and validation splits of a run from one of the supported sources, with one label map."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import datasets

from .coco_json import load_coco_detection
from .hf_datasets import prepare_detection_dataset
from .schema import AnnotationStats, DetectionSplit, get_id2label
from .synthetic import SYNTHETIC_VARIANTS, make_synthetic_detection_dataset


logger = logging.getLogger(__name__)

# Options of `load_detection_splits` and their defaults (the names of `examples/train.py`'s arguments).
SPLIT_OPTIONS: dict[str, object] = {
    "dataset_name": None,
    "dataset_config": None,
    "train_split": "train",
    "validation_split": "validation",
    "bbox_format": "auto",
    "coco_annotations": None,
    "coco_images": None,
    "validation_coco_annotations": None,
    "validation_coco_images": None,
    "synthetic_train_size": 4000,
    "synthetic_validation_size": 200,
    "synthetic_variant": "shapes",
    "synthetic_image_size": None,
    "synthetic_num_classes": 5,
    "synthetic_min_objects": None,
    "synthetic_max_objects": None,
    "max_train_samples": None,
    "max_eval_samples": None,
    "check_images": None,
    "on_bad_image": "error",
    "annotation_cache_dir": None,
    "seed": 42,
}


@dataclass
class DetectionSplits:
    """
    The splits of a run, sharing one label map.

    Attributes:
        train (`datasets.Dataset`): training examples in the common format (see `schema.py`).
        validation (`datasets.Dataset` or `None`): evaluation examples, `None` when there is no validation split.
        id2label (`dict[int, str]`): contiguous label -> class name (for `Pix2SeqConfig(id2label=...)`).
        label2category_id (`dict[int, int]`): contiguous label -> the data's own category id.
        stats (`dict[str, dict[str, int]]`): per split, the counts of `AnnotationStats`.
        source (`str`): where the data came from, for logs.
    """

    train: datasets.Dataset
    validation: datasets.Dataset | None
    id2label: dict[int, str]
    label2category_id: dict[int, int]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    source: str = ""


def _options(args: argparse.Namespace | Mapping | None, overrides: dict) -> dict:
    unknown = sorted(set(overrides) - set(SPLIT_OPTIONS))
    if unknown:
        raise TypeError(f"Unknown options {unknown}; known ones are {sorted(SPLIT_OPTIONS)}.")
    options = dict(SPLIT_OPTIONS)
    if args is not None:
        values = args if isinstance(args, Mapping) else vars(args)
        options.update({name: values[name] for name in SPLIT_OPTIONS if name in values})
    options.update(overrides)
    return options


def _head(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


def _load_hf(name: str, config: str | None) -> datasets.DatasetDict | datasets.Dataset:
    """A dataset saved with `save_to_disk` when `name` is such a folder, else `datasets.load_dataset(name, config)`."""
    if os.path.isdir(name) and any(
        os.path.isfile(os.path.join(name, marker)) for marker in ("dataset_dict.json", "state.json")
    ):
        return datasets.load_from_disk(name)
    return datasets.load_dataset(name, config)


def _pick_split(data, split: str, name: str) -> datasets.Dataset:
    if isinstance(data, datasets.Dataset):
        if split == "train":
            return data
        raise ValueError(f"{name} holds a single split; it has no split {split!r}. Pass --validation_split none.")
    if split not in data:
        raise ValueError(
            f"{name} has no split {split!r}; its splits are {list(data)}. Choose one with --train_split / "
            "--validation_split (or --validation_split none)."
        )
    return data[split]


def _synthetic_split(size: int, options: dict, split: str) -> DetectionSplit:
    variant = options["synthetic_variant"]
    if variant not in SYNTHETIC_VARIANTS:
        raise ValueError(f"Unknown synthetic_variant {variant!r}; choose one of {sorted(SYNTHETIC_VARIANTS)}.")
    settings = dict(SYNTHETIC_VARIANTS[variant])
    for name in ("image_size", "min_objects", "max_objects"):
        if options[f"synthetic_{name}"] is not None:
            settings[name] = options[f"synthetic_{name}"]
    dataset = make_synthetic_detection_dataset(
        size, seed=options["seed"], num_classes=options["synthetic_num_classes"], split=split, **settings
    )
    id2label = get_id2label(dataset)
    stats = AnnotationStats(images=len(dataset), objects=sum(len(o["bbox"]) for o in dataset["objects"]))
    return DetectionSplit(dataset, id2label, {label: label for label in id2label}, stats, split)


def load_detection_splits(args: argparse.Namespace | Mapping | None = None, **overrides) -> DetectionSplits:
    """
    Loads the training and validation splits from one source:

    - `coco_annotations` + `coco_images` (and optionally `validation_coco_annotations` + `validation_coco_images`):
      local COCO json + image folder (`load_coco_detection`);
    - `dataset_name`: a dataset folder saved with `save_to_disk`, or a `datasets.load_dataset` name or path, in
      CPPE-5 or xyxy style (`prepare_detection_dataset`, splits `train_split` / `validation_split`);
    - neither: the synthetic shapes set (`synthetic_train_size` / `synthetic_validation_size` images, seeded with
      `seed`, of the `synthetic_variant` (`SYNTHETIC_VARIANTS`: "shapes", 128 px with 1 to 10 objects, or "dense",
      384 px with 20 to 60 small objects) with `synthetic_num_classes` shapes; `synthetic_image_size`,
      `synthetic_min_objects` and `synthetic_max_objects` override the variant's).

    The validation split is read with the training split's label map (a category the training split does not have
    is an error). `validation_split="none"` (or no validation json) gives no validation split.

    Args:
        args (`argparse.Namespace` or `Mapping`, *optional*): options by name (e.g. `examples/train.py`'s parsed
            arguments); names that are not options are ignored.
        **overrides: options by keyword, taking precedence over `args`. The options and their defaults are
            `SPLIT_OPTIONS`; besides the sources: `bbox_format` ("auto"), `max_train_samples` / `max_eval_samples`
            (keep the first N examples), `check_images` (default "exists" for COCO json, "none" otherwise),
            `on_bad_image` ("error" or "skip") and `annotation_cache_dir` (where a COCO json's prepared split is
            kept, see `load_coco_detection`).

    Returns:
        `DetectionSplits`.
    """
    options = _options(args, overrides)
    validation_split = options["validation_split"]
    no_validation = validation_split is None or str(validation_split).lower() == "none"
    limit_train, limit_eval = options["max_train_samples"], options["max_eval_samples"]
    check_images, on_bad_image = options["check_images"], options["on_bad_image"]

    if options["coco_annotations"] or options["coco_images"]:
        if not (options["coco_annotations"] and options["coco_images"]):
            raise ValueError("`coco_annotations` and `coco_images` go together; give both.")
        source = f"COCO json {options['coco_annotations']}"
        coco_kwargs = {
            "check_images": check_images or "exists",
            "on_bad_image": on_bad_image,
            "cache_dir": options["annotation_cache_dir"],
        }
        train = load_coco_detection(
            options["coco_annotations"], options["coco_images"], split_name="train", **coco_kwargs
        )
        validation = None
        if not no_validation and (options["validation_coco_annotations"] or options["validation_coco_images"]):
            if not (options["validation_coco_annotations"] and options["validation_coco_images"]):
                raise ValueError("`validation_coco_annotations` and `validation_coco_images` go together; give both.")
            validation = load_coco_detection(
                options["validation_coco_annotations"],
                options["validation_coco_images"],
                label2category_id=train.label2category_id,
                split_name="validation",
                **coco_kwargs,
            )
        train.dataset = _head(train.dataset, limit_train)
        if validation is not None:
            validation.dataset = _head(validation.dataset, limit_eval)
    elif options["dataset_name"]:
        name = options["dataset_name"]
        source = f"dataset {name}" + (f" ({options['dataset_config']})" if options["dataset_config"] else "")
        data = _load_hf(name, options["dataset_config"])
        prepare_kwargs = {
            "bbox_format": options["bbox_format"],
            "check_images": check_images or "none",
            "on_bad_image": on_bad_image,
        }
        train = prepare_detection_dataset(
            _head(_pick_split(data, options["train_split"], source), limit_train), split_name="train", **prepare_kwargs
        )
        validation = None
        if not no_validation:
            # The dataset's own category ids of the training labels, so that validation shares the labels.
            category_names = {train.label2category_id[label]: name for label, name in train.id2label.items()}
            validation = prepare_detection_dataset(
                _head(_pick_split(data, validation_split, source), limit_eval),
                id2label=category_names,
                split_name="validation",
                **prepare_kwargs,
            )
    else:
        source = "synthetic shapes"
        train_size = options["synthetic_train_size"]
        train = _synthetic_split(min(train_size, limit_train or train_size), options, "train")
        validation = None
        if not no_validation:
            size = options["synthetic_validation_size"]
            validation = _synthetic_split(min(size, limit_eval or size), options, "validation")

    if no_validation:
        validation = None
    stats = {"train": train.stats.to_dict()}
    if validation is not None:
        stats["validation"] = validation.stats.to_dict()
    logger.info(
        f"Detection data from {source}: {len(train.dataset)} training and "
        f"{len(validation.dataset) if validation is not None else 0} validation images, {len(train.id2label)} classes."
    )
    return DetectionSplits(
        train=train.dataset,
        validation=validation.dataset if validation is not None else None,
        id2label=train.id2label,
        label2category_id=train.label2category_id,
        stats=stats,
        source=source,
    )
