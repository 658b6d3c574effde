"""Loading the train and validation splits of a run from one of the supported sources, with one label map."""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field

import datasets

from .. import training_options
from .coco_json import load_coco_detection
from .hf_datasets import prepare_detection_dataset
from .schema import AnnotationStats, DetectionSplit, get_id2label
from .synthetic import SYNTHETIC_VARIANTS, make_synthetic_detection_dataset


logger = logging.getLogger(__name__)

@dataclass
class DetectionSplits:
    """
    The splits of a run, sharing one label map.

    Attributes:
        train (`datasets.Dataset` or `None`): training examples in the common format (see `schema.py`); `None` when
            only the validation split was loaded.
        validation (`datasets.Dataset` or `None`): evaluation examples, `None` when there is no validation split.
        id2label (`dict[int, str]`): contiguous label -> class name (for `Pix2SeqConfig(id2label=...)`).
        label2category_id (`dict[int, int]`): contiguous label -> the data's own category id.
        stats (`dict[str, dict[str, int]]`): per split, the counts of `AnnotationStats`.
        source (`str`): where the data came from, for logs.
    """

    train: datasets.Dataset | None
    validation: datasets.Dataset | None
    id2label: dict[int, str]
    label2category_id: dict[int, int]
    stats: dict[str, dict[str, int]] = field(default_factory=dict)
    source: str = ""


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
        raise ValueError(f"{name} holds a single split; it has no split {split!r}. Set validation_split to 'none'.")
    if split not in data:
        raise ValueError(
            f"{name} has no split {split!r}; its splits are {list(data)}. Choose one with train_split / "
            "validation_split (or validation_split 'none')."
        )
    return data[split]


def _synthetic_split(size: int, options: training_options.DataOptions, seed: int, split: str) -> DetectionSplit:
    settings = dict(SYNTHETIC_VARIANTS[options.synthetic_variant])
    for name in ("image_size", "min_objects", "max_objects"):
        if getattr(options, f"synthetic_{name}") is not None:
            settings[name] = getattr(options, f"synthetic_{name}")
    dataset = make_synthetic_detection_dataset(
        size, seed=seed, num_classes=options.synthetic_num_classes, split=split, **settings
    )
    id2label = get_id2label(dataset)
    stats = AnnotationStats(images=len(dataset), objects=sum(len(o["bbox"]) for o in dataset["objects"]))
    return DetectionSplit(dataset, id2label, {label: label for label in id2label}, stats, split)


def load_detection_splits(
    options: training_options.DataOptions | None = None,
    *,
    seed: int | None = None,
    train: bool = True,
    **overrides,
) -> DetectionSplits:
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
        options (`training_options.DataOptions`, *optional*): the data options (defaults: `DataOptions()`, the
            synthetic set). Besides the sources: `bbox_format`, `max_train_samples` / `max_eval_samples` (keep the
            first N examples), `check_images` (default "exists" for COCO json, "none" otherwise), `on_bad_image`
            ("error" or "skip") and `annotation_cache_dir` (where a COCO json's prepared split is kept, see
            `load_coco_detection`).
        seed (`int`, *optional*): seed of the synthetic set (default: `training_options.DEFAULT_SEED`).
        train (`bool`, *optional*, defaults to `True`): `False` loads the validation split only, with its own label
            map (for evaluating a saved model): the COCO json `validation_coco_annotations` + `validation_coco_images`,
            the dataset's `validation_split`, or the synthetic validation split. `train` is then `None`.
        **overrides: fields of `options` by keyword, taking precedence (e.g. `synthetic_train_size=8`).

    Returns:
        `DetectionSplits`.

    Raises:
        `TypeError` for a keyword that is not a field of `DataOptions`; `ValueError` naming the option for a value it
        refuses (see `DataOptions`), or a split the data does not have.
    """
    unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(training_options.DataOptions)})
    if unknown:
        raise TypeError(f"Unknown data options {unknown}; the options are the fields of `DataOptions`.")
    options = dataclasses.replace(options or training_options.DataOptions(), **overrides)
    seed = training_options.DEFAULT_SEED if seed is None else seed
    validation_split = options.validation_split
    no_validation = validation_split is None or str(validation_split).lower() == "none"
    if not train and no_validation:
        raise ValueError(f"Only the validation split is to be loaded, but validation_split is {validation_split!r}.")
    limit_train, limit_eval = options.max_train_samples, options.max_eval_samples
    check_images, on_bad_image = options.check_images, options.on_bad_image
    train_split = validation = None

    if not train and options.coco_annotations and not options.validation_coco_annotations:
        raise ValueError(
            "Only the validation split is to be loaded, but validation_coco_annotations is not set (coco_annotations "
            f"is {options.coco_annotations!r}, the training json): give the json to evaluate as "
            "validation_coco_annotations with validation_coco_images."
        )
    if options.coco_annotations or (not train and options.validation_coco_annotations):
        source = f"COCO json {options.coco_annotations if train else options.validation_coco_annotations}"
        coco_kwargs = {
            "check_images": check_images or "exists",
            "on_bad_image": on_bad_image,
            "cache_dir": options.annotation_cache_dir,
        }
        if train:
            train_split = load_coco_detection(
                options.coco_annotations, options.coco_images, split_name="train", **coco_kwargs
            )
            train_split.dataset = _head(train_split.dataset, limit_train)
        if not no_validation and options.validation_coco_annotations:
            validation = load_coco_detection(
                options.validation_coco_annotations,
                options.validation_coco_images,
                label2category_id=train_split.label2category_id if train else None,
                split_name="validation",
                **coco_kwargs,
            )
            validation.dataset = _head(validation.dataset, limit_eval)
    elif options.dataset_name:
        name = options.dataset_name
        source = f"dataset {name}" + (f" ({options.dataset_config})" if options.dataset_config else "")
        data = _load_hf(name, options.dataset_config)
        prepare_kwargs = {
            "bbox_format": options.bbox_format,
            "check_images": check_images or "none",
            "on_bad_image": on_bad_image,
        }
        category_names = None
        if train:
            train_split = prepare_detection_dataset(
                _head(_pick_split(data, options.train_split, source), limit_train),
                split_name="train",
                **prepare_kwargs,
            )
            # The dataset's own category ids of the training labels, so that validation shares the labels.
            category_names = {train_split.label2category_id[label]: n for label, n in train_split.id2label.items()}
        if not no_validation:
            validation = prepare_detection_dataset(
                _head(_pick_split(data, validation_split, source), limit_eval),
                id2label=category_names,
                split_name="validation",
                **prepare_kwargs,
            )
    else:
        source = "synthetic shapes"
        if train:
            size = options.synthetic_train_size
            train_split = _synthetic_split(min(size, limit_train or size), options, seed, "train")
        if not no_validation:
            size = options.synthetic_validation_size
            validation = _synthetic_split(min(size, limit_eval or size), options, seed, "validation")

    labelled = train_split if train else validation
    stats = {"train": train_split.stats.to_dict()} if train else {}
    if validation is not None:
        stats["validation"] = validation.stats.to_dict()
    logger.info(
        f"Detection data from {source}: {len(train_split.dataset) if train else 0} training and "
        f"{len(validation.dataset) if validation is not None else 0} validation images, {len(labelled.id2label)} "
        "classes."
    )
    return DetectionSplits(
        train=train_split.dataset if train else None,
        validation=validation.dataset if validation is not None else None,
        id2label=labelled.id2label,
        label2category_id=labelled.label2category_id,
        stats=stats,
        source=source,
    )
