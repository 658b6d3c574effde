"""
The options of a training or evaluation run, shared by `examples/train.py`, `examples/run_object_detection.py` and
`examples/evaluate.py` (all parse them with `transformers.HfArgumentParser`), each with its one default and its one
check (`__post_init__`, which names the option).

- `DataOptions`: where the images come from (`pix2seq_hf.data.load_detection_splits`) and their augmentation;
- `ModelOptions`: the model to train (`training_setup.build_model_and_processor`);
- `RecipeOptions`: the optimisation (learning rates, AdamW, schedule, budget, seed), `resolved` for a run from scratch
  or a fine-tuning one, on the synthetic set or not, and `plan`ned from the data (`training_plan`);
- `EvaluationOptions`: how the evaluation decodes;
- `RunOptions`: the run itself under `examples/train.py` (output folder, checkpoints, logging, Hub); the `Trainer`
  script takes these from `TrainingArguments`, as `Pix2SeqTrainingArguments`, whose optimisation options default to
  `RecipeOptions`'.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

from . import training_plan, training_recipes
from .box_codec import check_coordinate_window
from .data.images import MAX_IMAGE_PIXELS_HELP
from .data.synthetic import SYNTHETIC_VARIANTS
from .data.transforms import AUGMENTATION_PRESETS
from .presets import PRESETS


# The seed of the initialisation, the data order, the augmentation and the synthetic set.
DEFAULT_SEED = 42
# Learning rates when none is given: from scratch, and fine-tuning a saved model (the paper's fine-tuning rate).
SCRATCH_LEARNING_RATE = 2e-3
FINETUNE_LEARNING_RATE = 3e-5
# Learning-rate factor of the Transformer encoder when training from scratch: at the full rate the encoder drowns the
# image in a growing image-independent component and the decoder learns only the sequence prior (docs/training.md).
SCRATCH_ENCODER_LR_SCALE = 0.1
# Share of the budget over which the learning rate decays to 0 when training from scratch: the full rate until 80% of
# the steps (or minutes), then linear decay. The default run reaches about twice the mAP of a decay over the whole run
# at 3000 steps (examples/benchmarks/RESULTS.md). Fine-tuning keeps the paper's linear decay over the whole run.
SCRATCH_LR_DECAY_FRACTION = 0.2
# The default run on the synthetic set: this many epochs of 4000 images, or this many minutes, whichever ends first,
# at batch 8 (more updates in the minutes a CPU run has; larger sets get at most `training_plan.MAX_BATCH_SIZE`),
# evaluated every `SYNTHETIC_EVAL_STEPS` steps.
SYNTHETIC_EPOCHS = 10
SYNTHETIC_MINUTES = 13.5
SYNTHETIC_BATCH_SIZE = 8
SYNTHETIC_EVAL_STEPS = 1000
# Augmentation of the synthetic set when none is given: none. Its 4000 images already vary in every way the
# validation images do, and within the default budget (6-10 epochs) scale jitter and flips only slowed learning
# (examples/benchmarks/RESULTS.md). Other data gets the official fine-tuning augmentation.
SYNTHETIC_AUGMENTATION = "none"
# Training sequences per image and step when none is given: one, as the paper. Several draws per image (object order,
# noise objects, class corruption) cost 1.15-1.35x a step for four; with the paper's random order two to eight gave
# 1.3-1.45x the mAP at 3000 steps, with the default `dist2ori` order nothing (examples/benchmarks/RESULTS.md).
SEQUENCES_PER_IMAGE = 1
# Options that `TrainingArguments` spells otherwise (the `Trainer` script's name -> `RecipeOptions`' name).
TRAINING_ARGUMENTS_NAMES = {"max_steps": "max_train_steps", "warmup_steps": "num_warmup_steps"}
# `RecipeOptions` that only examples/train.py's own loop takes (the `Trainer` has no weight average).
TRAIN_SCRIPT_ONLY_OPTIONS = ("ema_decay",)


def option(default=None, help: str = "", choices=None, aliases=None, default_factory=None):
    """A dataclass field for `HfArgumentParser`: its default, its `--help` text, and its choices or other spellings."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = sorted(choices)
    if aliases is not None:
        metadata["aliases"] = aliases
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def option_of(options_class: type, name: str, **metadata):
    """
    The field of `options_class`'s option `name` (its default and help), for a dataclass that must declare that
    option itself: `run_object_detection.py`'s `TrainingArguments`, whose own fields of the same names it replaces.
    `metadata` is added (e.g. `aliases`).
    """
    source = options_class.__dataclass_fields__[name]
    return field(default=source.default, metadata={**source.metadata, **metadata})


def _check_choice(name: str, value, choices) -> None:
    if value is not None and value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}.")


def _check_at_least(name: str, value, minimum, optional: bool = True) -> None:
    if (value is not None or not optional) and not (value is not None and value >= minimum):
        raise ValueError(f"{name} must be at least {minimum}, got {value!r}.")


def _check_positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}.")


@dataclass
class DataOptions:
    """Where the images of a run come from (see `pix2seq_hf.data.load_detection_splits`) and their augmentation."""

    _argument_group_name = "data"
    # What only a training run reads (an evaluation reads its validation split whole, never augmented).
    TRAINING_ONLY: ClassVar[tuple[str, ...]] = (
        "train_split", "streaming", "synthetic_train_size", "max_train_samples", "augmentation", "num_augmentations",
        "sequences_per_image",
    )  # fmt: skip

    dataset_name: str | None = option(help="Hub id or local path of a HF dataset (default: the synthetic set).")
    dataset_config: str | None = option(help="Config name of the dataset.")
    train_split: str = option("train", help="Split of the dataset to train on.")
    streaming: bool = option(
        False,
        help="Read the training split of --dataset_name as a stream (Hub or local; nothing downloaded or prepared "
        "first), split between processes and DataLoader workers, shuffled with a buffer, its position saved in "
        "checkpoints. Needs --max_train_steps or --max_train_minutes, and split sizes in the dataset's info.",
    )
    validation_split: str = option("validation", help="Split to evaluate on ('none' to skip).")
    bbox_format: str = option(
        "auto", help="Box format of a HF dataset ('auto': read from its features or the data).",
        choices=["auto", "xywh", "xyxy"],
    )  # fmt: skip
    coco_annotations: str | None = option(help="COCO json of the training images.")
    coco_images: str | None = option(help="Folder of the training images (their `file_name` is relative to it).")
    validation_coco_annotations: str | None = option(help="COCO json of the validation images.")
    validation_coco_images: str | None = option(help="Folder of the validation images.")
    synthetic_train_size: int = option(4000, help="Images in the synthetic train split.")
    synthetic_validation_size: int = option(200, help="Images in the synthetic validation split.")
    synthetic_variant: str = option(
        "shapes",
        help="The synthetic set: 'shapes' (128 px, 1-10 objects) or 'dense' (384 px, 20-60 small objects; train it "
        "with --image_size 384 --max_objects 64).",
        choices=SYNTHETIC_VARIANTS,
    )
    synthetic_image_size: int | None = option(help="Image size of the synthetic set (default: the variant's).")
    synthetic_num_classes: int = option(5, help="Shape classes of the synthetic set.")
    synthetic_min_objects: int | None = option(help="Fewest objects of a synthetic image (default: the variant's).")
    synthetic_max_objects: int | None = option(help="Most objects of a synthetic image (default: the variant's).")
    max_train_samples: int | None = option(help="Train on the first N images only.")
    max_eval_samples: int | None = option(help="Evaluate on the first N images only.")
    augmentation: str | None = option(
        help=f"Training augmentation (default: '{SYNTHETIC_AUGMENTATION}' on the synthetic set, the official "
        "'finetune' recipe otherwise).",
        choices=AUGMENTATION_PRESETS,
    )
    num_augmentations: int = option(1, help="Augmented copies of each image per batch (paper: 2).")
    sequences_per_image: int = option(
        SEQUENCES_PER_IMAGE,
        help="Training sequences per image and step, each with its own object order (when random), noise objects and "
        "class corruption; one encoder pass serves them all (paper: 1). See docs/training.md.",
    )
    check_images: str | None = option(
        help="Check the images before training: 'exists' (files are there; the default for COCO json), 'decode' "
        "(every image decodes; reads them all), 'none' (the default for datasets).",
        choices=["none", "exists", "decode"],
    )
    on_bad_image: str = option(
        "error",
        help="A missing or undecodable image, found by --check_images or met while training or evaluating: stop with "
        "an error naming it, or skip it (counted and logged).",
        choices=["error", "skip"],
    )
    annotation_cache_dir: str | None = option(
        help="Where a COCO json is kept once prepared (memory-mapped, shared by the processes of a machine). "
        "Default: pix2seq_annotations in the datasets cache (HF_DATASETS_CACHE)."
    )
    max_image_pixels: int | None = option(help=MAX_IMAGE_PIXELS_HELP)

    def __post_init__(self):
        _check_choice("bbox_format", self.bbox_format, ["auto", "xywh", "xyxy"])
        _check_choice("synthetic_variant", self.synthetic_variant, SYNTHETIC_VARIANTS)
        _check_choice("augmentation", self.augmentation, AUGMENTATION_PRESETS)
        _check_choice("check_images", self.check_images, ["none", "exists", "decode"])
        _check_choice("on_bad_image", self.on_bad_image, ["error", "skip"])
        for first, second in (
            ("coco_annotations", "coco_images"),
            ("validation_coco_annotations", "validation_coco_images"),
        ):
            if (getattr(self, first) is None) != (getattr(self, second) is None):
                raise ValueError(
                    f"{first} and {second} go together; give both (got only {first if getattr(self, first) else second})."
                )
        for name in (
            "synthetic_train_size", "synthetic_validation_size", "synthetic_image_size", "synthetic_num_classes",
            "max_train_samples", "max_eval_samples", "num_augmentations", "sequences_per_image",
        ):  # fmt: skip
            _check_at_least(name, getattr(self, name), 1)
        _check_at_least("max_image_pixels", self.max_image_pixels, 0)
        if self.streaming and not self.dataset_name:
            raise ValueError("streaming reads dataset_name (a Hub dataset or a local folder); none was given.")
        if self.streaming and self.max_train_samples is not None:
            raise ValueError("max_train_samples reads the head of a split, which a shuffled stream has not: drop it.")

    @property
    def synthetic(self) -> bool:
        """Whether the run uses the built-in synthetic set (no dataset and no COCO json given)."""
        return not (self.dataset_name or self.coco_annotations)

    @property
    def training_augmentation(self) -> str:
        """`augmentation`, or its default: `SYNTHETIC_AUGMENTATION` on the synthetic set, `"finetune"` otherwise."""
        return self.augmentation or (SYNTHETIC_AUGMENTATION if self.synthetic else "finetune")


@dataclass
class ModelOptions:
    """The model a run trains: a new one of a preset, or a saved one (see `training_setup.build_model_and_processor`)."""

    _argument_group_name = "model"

    model_name_or_path: str | None = option(help="A saved Pix2Seq model to fine-tune.")
    config_preset: str = option(
        "tiny", help="Architecture of a new model (see docs/model.md); ignored with --model_name_or_path.",
        choices=PRESETS,
    )  # fmt: skip
    pretrained_backbone: bool = option(False, help="Start from ImageNet timm weights (Hub).")
    backbone_checkpoint: str | None = option(
        help="A local file of timm backbone weights to start a new model from, instead of the Hub's (a timm model's "
        "state dict saved with safetensors or torch.save, e.g. the `model.safetensors` of a timm model; the backbone "
        "is the preset's or --config_overrides' `backbone`). Default: none (random weights, or --pretrained_backbone)."
    )
    config_overrides: dict | str | None = option(
        help="Other config fields of a new model, as JSON, e.g. '{\"decoder_layers\": 4}' or "
        '\'{"backbone_kwargs": {"out_indices": [2]}}\' (features at stride 8).'
    )
    image_size: int | None = option(help="Canvas size (default: the preset's, or the saved processor's).")
    max_objects: int | None = option(
        help="Objects per image in a sequence (default: the preset's, 100 or the tiny preset's 10; a new model gets "
        "the fullest training image's count, rounded up to a multiple of 8, when that is more)."
    )
    num_bins: int | None = option(help="Coordinate quantisation bins (default: the preset's, 1000).")
    no_sequence_augmentation: bool = option(
        False, help="Train on real objects then EOS, without the paper's noise objects (sequence augmentation)."
    )
    object_order: str | None = option(
        help="Order of the objects in a training sequence (default: 'dist2ori' from scratch, the saved processor's "
        "when fine-tuning; the paper's is 'random'). See docs/training.md.",
        choices=["random", "area", "dist2ori", "class"],
    )
    coordinate_label_sigma: float | None = option(
        help="Soft coordinate targets: Gaussian of this sigma in bins (0: one-hot, the paper). Default: the saved "
        "model's when fine-tuning, else the recipe's (see docs/training.md)."
    )
    auxiliary_loss_weight: float | None = option(
        help="Weight of the auxiliary dense loss on the encoder output (0: none, the paper). Default: the saved "
        "model's when fine-tuning, else the recipe's (see docs/training.md)."
    )
    coordinate_embedding_init: str | None = option(
        help="How a new model's coordinate-token embeddings start ('normal': the paper; 'sincos': position codes of "
        "their bins). Default: the recipe's (see docs/training.md).",
        choices=["normal", "sincos"],
    )
    auxiliary_copy: bool | None = option(
        help="true/false: coordinate and class tokens partly copied from the auxiliary head's boxes and classes, "
        "through a pointer over the memory cells (needs the auxiliary head). Default: the saved model's when "
        "fine-tuning, else the recipe's: on with the auxiliary head (see docs/training.md).",
    )

    def __post_init__(self):
        _check_choice("config_preset", self.config_preset, PRESETS)
        _check_choice("object_order", self.object_order, ["random", "area", "dist2ori", "class"])
        _check_choice("coordinate_embedding_init", self.coordinate_embedding_init, ["normal", "sincos"])
        if isinstance(self.config_overrides, str):
            try:
                self.config_overrides = json.loads(self.config_overrides)
            except json.JSONDecodeError as error:
                raise ValueError(f"config_overrides is not valid JSON ({error}): {self.config_overrides!r}") from None
        if self.config_overrides is not None and not isinstance(self.config_overrides, dict):
            raise ValueError(
                f"config_overrides must be a JSON object of config fields, got {self.config_overrides!r}."
            )
        for name in ("image_size", "max_objects", "num_bins"):
            _check_at_least(name, getattr(self, name), 1)
        for name in ("coordinate_label_sigma", "auxiliary_loss_weight"):
            _check_at_least(name, getattr(self, name), 0)


@dataclass
class RecipeOptions:
    """
    The optimisation of a run. The values left unset depend on the run and are filled in by `resolved`: the learning
    rates (from scratch or fine-tuning), and on the synthetic set its epochs and minutes; the batch size, steps and
    warm-up by `plan` from the data.
    """

    _argument_group_name = "optimisation"

    recipe: str | None = option(
        help="A named recipe of the paper: its image size, augmentation, global batch (split over the processes), "
        "steps or epochs, learning rate and schedule (see 'Training at scale' in docs/training.md); options given "
        "explicitly override them. Default: none.",
        choices=training_recipes.RECIPES,
    )
    per_device_train_batch_size: int | None = option(
        help=f"Images per batch and process. Default: planned from the data, {training_plan.MAX_BATCH_SIZE} "
        f"({SYNTHETIC_BATCH_SIZE} on the synthetic set), halved while an epoch would have fewer than "
        f"{training_plan.MIN_STEPS_PER_EPOCH} steps (see 'How a run is planned' in docs/training.md)."
    )
    learning_rate: float | None = option(
        help=f"Default: {SCRATCH_LEARNING_RATE} from scratch, {FINETUNE_LEARNING_RATE} when fine-tuning a saved model "
        "(--model_name_or_path; the paper's fine-tuning rate)."
    )
    encoder_lr_scale: float | None = option(
        help="Learning-rate factor of the Transformer encoder (input projection, layers, bridge; not the backbone). "
        f"Default: {SCRATCH_ENCODER_LR_SCALE} when training from scratch (no --model_name_or_path), else 1. See "
        "docs/training.md."
    )
    weight_decay: float = option(0.05, help="AdamW weight decay (the paper's 0.05).")
    adam_beta1: float = option(0.9, help="AdamW beta1.")
    adam_beta2: float = option(
        0.95,
        help="AdamW beta2: 0.95, the official Pix2Seq code's, in place of the usual 0.999 (a shorter average of "
        "squared gradients, steadier for Transformers trained at high learning rates).",
    )
    max_grad_norm: float = option(1.0, help="Clip the gradient norm to this (0: no clipping).")
    ema_decay: float | None = option(
        help="Keep an exponential moving average of the weights, updated after each step with this decay (e.g. "
        "0.999: an average over about the last 1000 steps); the evaluations and the saved model use the average. "
        "Default: none (the weights as trained)."
    )
    lr_scheduler_type: str = option(
        "linear",
        help="A transformers scheduler name. With --max_train_minutes, `linear` (the default) decays to 0 at "
        "whichever ends first, the steps or the minutes; the others need a step count (--max_train_steps or "
        "--num_train_epochs).",
    )
    lr_decay_fraction: float | None = option(
        help="With the `linear` schedule: the last share of the budget (steps or minutes) over which the rate decays "
        "to 0; before it the rate stays at --learning_rate (1: decay from the end of the warm-up on). Default: "
        f"{SCRATCH_LR_DECAY_FRACTION} when training from scratch, else 1 (see docs/training.md).",
    )
    num_warmup_steps: int | None = option(
        help=f"Steps of linear warm-up from 0. Default: {training_plan.WARMUP_FRACTION * 100:g}%% of the planned steps "
        f"(at most {training_plan.MAX_WARMUP_STEPS}) and, with --max_train_minutes and the linear schedule, at most "
        f"{training_plan.WARMUP_FRACTION * 100:g}%% of the minutes, whichever ends first."
    )
    gradient_accumulation_steps: int = option(1, help="Batches accumulated into one optimizer step.")
    num_train_epochs: float | None = option(
        help=f"Default: {SYNTHETIC_EPOCHS} on the synthetic set ({SYNTHETIC_EPOCHS * 500} steps at batch "
        f"{SYNTHETIC_BATCH_SIZE}, or {SYNTHETIC_MINUTES} minutes, whichever ends first; see --max_train_minutes); "
        "otherwise as many as fit in --max_train_minutes when only that is given, else "
        f"{training_plan.DEFAULT_NUM_EPOCHS} but at least {training_plan.MIN_PLANNED_STEPS} steps."
    )
    max_train_steps: int | None = option(help="Optimizer updates to train (overrides --num_train_epochs).")
    max_train_minutes: float | None = option(
        help="Stop (and evaluate/save) after this many minutes of the run, evaluations and the time before a resume "
        "included; alone (without --max_train_steps or --num_train_epochs), it decides how many steps the run makes. "
        f"Default: none, except {SYNTHETIC_MINUTES} on the synthetic set when neither --max_train_steps nor "
        "--num_train_epochs is given, so that the default run ends in about 15 minutes on a slow machine too."
    )
    seed: int = option(DEFAULT_SEED, help="Seed of the initialisation, data order, augmentation and synthetic set.")

    def __post_init__(self):
        for name in ("learning_rate", "encoder_lr_scale", "num_train_epochs", "max_train_steps", "max_train_minutes"):
            _check_positive(name, getattr(self, name))
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
            _check_at_least(name, getattr(self, name), 1)
        for name in ("weight_decay", "max_grad_norm", "num_warmup_steps"):
            _check_at_least(name, getattr(self, name), 0)
        if self.lr_decay_fraction is not None and not 0 < self.lr_decay_fraction <= 1:
            raise ValueError(f"lr_decay_fraction must be in (0, 1], got {self.lr_decay_fraction!r}.")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay!r}.")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)!r}.")

    def resolved(self, synthetic: bool, fine_tuning: bool) -> RecipeOptions:
        """
        The recipe with the defaults that depend on the run filled in: `learning_rate`, `encoder_lr_scale` and
        `lr_decay_fraction` (from scratch or fine-tuning), and on the synthetic set, when no budget is given,
        `SYNTHETIC_MINUTES` and `SYNTHETIC_EPOCHS`.

        Args:
            synthetic (`bool`): whether the run trains on the built-in synthetic set (`DataOptions.synthetic`).
            fine_tuning (`bool`): whether it starts from a saved model (`ModelOptions.model_name_or_path`).

        Returns:
            `RecipeOptions`: a new one (this one is unchanged).
        """
        values = {}
        if self.learning_rate is None:
            values["learning_rate"] = FINETUNE_LEARNING_RATE if fine_tuning else SCRATCH_LEARNING_RATE
        if self.encoder_lr_scale is None:
            values["encoder_lr_scale"] = 1.0 if fine_tuning else SCRATCH_ENCODER_LR_SCALE
        if self.lr_decay_fraction is None:
            values["lr_decay_fraction"] = 1.0 if fine_tuning else SCRATCH_LR_DECAY_FRACTION
        if synthetic:
            if self.max_train_minutes is None and self.max_train_steps is None and self.num_train_epochs is None:
                values["max_train_minutes"] = SYNTHETIC_MINUTES
            if self.num_train_epochs is None:
                values["num_train_epochs"] = SYNTHETIC_EPOCHS
        return dataclasses.replace(self, **values)

    def plan(self, num_images: int, num_processes: int, synthetic: bool) -> training_plan.TrainingPlan:
        """
        The run's plan (`training_plan.plan_training`): batch size, steps and warm-up from the training images and
        the budget, every value given kept. On the synthetic set the default batch is at most `SYNTHETIC_BATCH_SIZE`.
        """
        return training_plan.plan_training(
            num_images,
            per_device_batch_size=self.per_device_train_batch_size,
            num_epochs=self.num_train_epochs,
            max_train_steps=self.max_train_steps,
            max_train_minutes=self.max_train_minutes,
            num_warmup_steps=self.num_warmup_steps,
            num_processes=num_processes,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            lr_scheduler_type=self.lr_scheduler_type,
            decay_fraction=1.0 if self.lr_decay_fraction is None else self.lr_decay_fraction,
            max_batch_size=SYNTHETIC_BATCH_SIZE if synthetic else training_plan.MAX_BATCH_SIZE,
        )


@dataclass
class EvaluationOptions:
    """How the evaluation decodes (at the evaluations of a training run, and in `examples/evaluate.py`)."""

    _argument_group_name = "evaluation"

    eval_top_p: float | None = option(
        help="Sample with this nucleus mass at evaluation (unset: greedy decoding).", aliases=["--top_p"]
    )

    eval_coordinate_window: int | None = option(
        help="Read each box coordinate as the mean bin of the model's distribution within this many bins of the "
        "written one and weigh each score by the coordinates' probability mass there (0: the written bins and the "
        "class probability, as the official code reads them). Unset: the model's generation config "
        "(`coordinate_window`).",
        aliases=["--coordinate_window"],
    )

    def __post_init__(self):
        if self.eval_top_p is not None and not 0 < self.eval_top_p <= 1:
            raise ValueError(f"eval_top_p must be in (0, 1], got {self.eval_top_p!r}.")
        if self.eval_coordinate_window is not None:
            check_coordinate_window(self.eval_coordinate_window)

    def generation_kwargs(self) -> dict:
        """The `generate` arguments of an evaluation: greedy, or nucleus sampling with `eval_top_p`, and the
        coordinate reading `eval_coordinate_window` when set."""
        kwargs = {"do_sample": False} if self.eval_top_p is None else {"do_sample": True, "top_p": self.eval_top_p}
        if self.eval_coordinate_window is not None:
            kwargs["coordinate_window"] = self.eval_coordinate_window
        return kwargs


@dataclass
class RunOptions:
    """The run under `examples/train.py`: output folder, checkpoints, processes, logging and the Hub."""

    _argument_group_name = "run"

    output_dir: str = option("outputs/pix2seq-synthetic", help="Where the model, checkpoints and results go.")
    overwrite_output_dir: bool = option(
        False,
        help="Start a new run in an --output_dir that holds a model or checkpoints of another run (its checkpoints are "
        "removed; its model is replaced at the end).",
    )
    per_device_eval_batch_size: int = option(64, help="Images per evaluation batch and process.")
    dataloader_num_workers: int = option(0, help="DataLoader worker processes (0: load in the main one).")
    num_threads: int | None = option(
        help="torch threads per process on the CPU (default: the usable cores divided by the processes on this "
        "machine; `accelerate launch` sets OMP_NUM_THREADS=1, which would leave one core working)."
    )
    cpu: bool = option(
        False,
        help="Train on the CPU even if a GPU is there (automatic for several processes on a machine without CUDA).",
    )
    mixed_precision: str = option(
        "auto",
        help="Autocast precision of the forward passes. 'auto': Accelerate's setting (`accelerate launch "
        "--mixed_precision`, its config), and where that is 'no', bf16 on a CPU with bf16 matrix units (Intel AMX), "
        "about 1.4x faster there; 'no' trains in float32 everywhere.",
        choices=["auto", "no", "fp16", "bf16"],
    )
    checkpointing_steps: str | None = option(help="Save state every N steps, or 'epoch'.")
    logging_steps: int = option(
        50, help="When the output is not a terminal (e.g. a log file), no progress bar: log the loss every N steps."
    )
    checkpoints_total_limit: int | None = option(help="Keep only the newest K checkpoints (default: all).")
    resume_from_checkpoint: str | None = option(
        help="A step_N checkpoint folder, or 'latest' (the newest complete one in --output_dir)."
    )
    eval_steps: int | None = option(
        help=f"Evaluate every N steps (default: {SYNTHETIC_EVAL_STEPS} on the synthetic set, else at the end)."
    )
    num_visualizations: int = option(8, help="Validation images drawn at the end.")
    with_tracking: bool = option(False, help="Log to the trackers of --report_to.")
    report_to: str = option("tensorboard", help="Accelerate trackers for --with_tracking ('all').")
    push_to_hub: bool = option(False, help="Upload the model, processor and a model card to the Hub.")
    hub_model_id: str | None = option(help="Hub repository of --push_to_hub (unset: the name of --output_dir).")
    hub_strategy: str = option(
        "end", help="With --push_to_hub: upload at the end only, or also the model at every checkpoint.",
        choices=["end", "every_save"],
    )  # fmt: skip

    def __post_init__(self):
        _check_choice("mixed_precision", self.mixed_precision, ["auto", "no", "fp16", "bf16"])
        _check_choice("hub_strategy", self.hub_strategy, ["end", "every_save"])
        for name in ("num_threads", "checkpoints_total_limit", "per_device_eval_batch_size", "eval_steps"):
            _check_at_least(name, getattr(self, name), 1)
        for name in ("dataloader_num_workers", "logging_steps", "num_visualizations"):
            _check_at_least(name, getattr(self, name), 0)
        steps = self.checkpointing_steps
        if steps is not None and steps != "epoch" and not (steps.isdigit() and int(steps) >= 1):
            raise ValueError(f"checkpointing_steps must be a positive integer or 'epoch', got {steps!r}.")
        if self.overwrite_output_dir and self.resume_from_checkpoint:
            raise ValueError(
                "overwrite_output_dir starts a new run and resume_from_checkpoint continues one: give one of them."
            )


@dataclass
class Pix2SeqTrainingArguments(TrainingArguments):
    """
    `TrainingArguments` for `examples/run_object_detection.py` (the `Trainer`), whose optimisation options default to
    `examples/train.py`'s recipe (`RecipeOptions`, under the `Trainer`'s names: `max_steps` is `max_train_steps`,
    `warmup_steps` is `num_warmup_steps`, and both spellings are accepted), with the recipe's options that
    `TrainingArguments` lacks (`recipe`, `encoder_lr_scale`, `lr_decay_fraction`, `max_train_minutes`; not
    `TRAIN_SCRIPT_ONLY_OPTIONS`). The values left unset are resolved with the data by the script
    (`RecipeOptions.resolved` and `RecipeOptions.plan`), as `examples/train.py` resolves them. `do_train` and
    `do_eval` are on by default. Defined in the package rather than in the script so that the `training_args.bin` of
    its checkpoints loads anywhere.
    """

    do_train: bool = option(True, help="Train.")
    do_eval: bool = option(True, help="Evaluate on the validation split at the end (and with --eval_strategy).")
    per_device_train_batch_size: int | None = option_of(RecipeOptions, "per_device_train_batch_size")
    per_device_eval_batch_size: int = option_of(RunOptions, "per_device_eval_batch_size")
    gradient_accumulation_steps: int = option_of(RecipeOptions, "gradient_accumulation_steps")
    learning_rate: float | None = option_of(RecipeOptions, "learning_rate")
    weight_decay: float = option_of(RecipeOptions, "weight_decay")
    adam_beta1: float = option_of(RecipeOptions, "adam_beta1")
    adam_beta2: float = option_of(RecipeOptions, "adam_beta2")
    max_grad_norm: float = option_of(RecipeOptions, "max_grad_norm")
    num_train_epochs: float | None = option_of(RecipeOptions, "num_train_epochs")
    max_steps: int | None = option_of(RecipeOptions, "max_train_steps", aliases=["--max_train_steps"])
    lr_scheduler_type: str = option_of(RecipeOptions, "lr_scheduler_type")
    lr_decay_fraction: float | None = option_of(RecipeOptions, "lr_decay_fraction")
    warmup_steps: float | None = option_of(RecipeOptions, "num_warmup_steps", aliases=["--num_warmup_steps"])
    seed: int = option_of(RecipeOptions, "seed")
    recipe: str | None = option_of(RecipeOptions, "recipe")
    encoder_lr_scale: float | None = option_of(RecipeOptions, "encoder_lr_scale")
    max_train_minutes: float | None = option_of(RecipeOptions, "max_train_minutes")

    def __post_init__(self):
        if self.max_steps is not None and self.max_steps <= 0:
            self.max_steps = None  # the `Trainer`'s -1: no step count
        if self.warmup_steps is not None and 0 < self.warmup_steps < 1:
            raise ValueError(
                f"warmup_steps counts steps here (examples/train.py's num_warmup_steps), got the ratio "
                f"{self.warmup_steps!r}: give a number of steps, or leave it unset for the planned warm-up."
            )
        self.recipe_options()  # refuses a value the recipe does not take, naming the option
        # Unset values are planned in `run`; `TrainingArguments` needs numbers meanwhile.
        warmup_steps, self.warmup_steps = self.warmup_steps, self.warmup_steps or 0
        super().__post_init__()
        self.warmup_steps = warmup_steps

    def recipe_options(self) -> RecipeOptions:
        """The optimisation options as `RecipeOptions` (under `examples/train.py`'s names)."""
        trainer_names = {name: trainer_name for trainer_name, name in TRAINING_ARGUMENTS_NAMES.items()}
        values = {
            name: getattr(self, trainer_names.get(name, name))
            for name in RecipeOptions.__dataclass_fields__
            if name not in TRAIN_SCRIPT_ONLY_OPTIONS
        }
        scheduler = values["lr_scheduler_type"]
        values["lr_scheduler_type"] = getattr(scheduler, "value", scheduler)
        return RecipeOptions(**values)


__all__ = [
    "DEFAULT_SEED",
    "DataOptions",
    "EvaluationOptions",
    "ModelOptions",
    "Pix2SeqTrainingArguments",
    "RecipeOptions",
    "RunOptions",
    "TRAINING_ARGUMENTS_NAMES",
    "TRAIN_SCRIPT_ONLY_OPTIONS",
    "option",
    "option_of",
]
