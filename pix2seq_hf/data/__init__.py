"""
The data layer of pix2seq_hf: dataset adapters into one common example format, training augmentation, the synthetic
shapes set and the collator. Data flows one way: data -> processor -> model; nothing in `modeling_*` imports it.
"""

from .bbox_format import BBoxFormatEvidence, collect_bbox_evidence, detect_bbox_format
from .coco_json import load_coco_detection
from .collator import Pix2SeqCollator, derive_seed
from .hf_datasets import prepare_detection_dataset
from .images import ImageReadError, decode_image, undecoded_images
from .real_images import build_coins_dataset
from .schema import AnnotationStats, DetectionSplit, detection_features, get_id2label, objects_per_image
from .splits import DetectionSplits, load_detection_splits
from .synthetic import SHAPE_NAMES, SYNTHETIC_VARIANTS, load_synthetic_detection, make_synthetic_detection_dataset
from .transforms import (
    AUGMENTATION_PRESETS,
    AugmentationConfig,
    RandomCropToCanvas,
    apply_transforms,
    build_train_transforms,
)


__all__ = [
    "AUGMENTATION_PRESETS",
    "SHAPE_NAMES",
    "SYNTHETIC_VARIANTS",
    "AnnotationStats",
    "AugmentationConfig",
    "BBoxFormatEvidence",
    "DetectionSplit",
    "DetectionSplits",
    "ImageReadError",
    "Pix2SeqCollator",
    "RandomCropToCanvas",
    "apply_transforms",
    "build_coins_dataset",
    "build_train_transforms",
    "collect_bbox_evidence",
    "decode_image",
    "derive_seed",
    "detect_bbox_format",
    "detection_features",
    "get_id2label",
    "load_coco_detection",
    "load_detection_splits",
    "load_synthetic_detection",
    "make_synthetic_detection_dataset",
    "objects_per_image",
    "prepare_detection_dataset",
    "undecoded_images",
]
