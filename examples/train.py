"""Train (or fine-tune) Pix2Seq with Accelerate on HF `datasets`, evaluate with COCO mAP, save a loadable model.

With no arguments it trains the small `tiny` model on the built-in synthetic shapes set on the CPU and reports mAP:

    accelerate launch --num_processes 1 examples/train.py

Other data:

    # a dataset on the Hub or on disk, CPPE-5 style (objects.bbox in COCO xywh) or an xyxy repackaging of COCO
    accelerate launch examples/train.py --dataset_name cppe-5 --config_preset r50 --pretrained_backbone
    # a local COCO json + image folder (COCO 2017, Objects365, any COCO-style set)
    accelerate launch examples/train.py --coco_annotations ann/instances_train2017.json --coco_images train2017 \\
        --validation_coco_annotations ann/instances_val2017.json --validation_coco_images val2017

Two processes on one CPU machine (gloo): `torchrun --nproc_per_node 2 examples/train.py` or
`accelerate launch --multi_gpu --num_processes 2 examples/train.py` (not `accelerate launch --cpu --num_processes 2`,
which starts one process; see docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, parse_flag_from_env, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import pix2seq_hf  # noqa: F401  (registers the Auto classes)
from pix2seq_hf import hub, training_plan, training_recipes, training_setup
from pix2seq_hf.checkpointing import (
    check_output_dir,
    check_same_run,
    find_checkpoint,
    read_training_state,
    remove_checkpoints,
    save_checkpoint,
    write_files_atomically,
)
from pix2seq_hf.cli import HelpFormatter
from pix2seq_hf.data import (
    AUGMENTATION_PRESETS,
    ImageReadError,
    SYNTHETIC_VARIANTS,
    Pix2SeqCollator,
    build_train_transforms,
    decode_image,
    load_detection_splits,
    undecoded_images,
)
from pix2seq_hf.data.images import MAX_IMAGE_PIXELS_HELP, set_max_image_pixels, to_rgb
from pix2seq_hf.data.streaming import StreamingDataLoader, load_streaming_splits
from pix2seq_hf.evaluation import METRIC_KEYS, evaluate_model
from pix2seq_hf.interruption import StopOnSignal
from pix2seq_hf.presets import PRESETS
from pix2seq_hf.run_lock import hold_output_dir
from pix2seq_hf.visualization import draw_detections


logger = get_logger(__name__)

# The arguments that define a run: a checkpoint written with other values belongs to another run and is not resumed.
RUN_ARGUMENTS = (
    "dataset_name",
    "dataset_config",
    "train_split",
    "streaming",
    "bbox_format",
    "coco_annotations",
    "coco_images",
    "synthetic_train_size",
    "synthetic_variant",
    "max_train_samples",
    "augmentation",
    "num_augmentations",
    "model_name_or_path",
    "config_preset",
    "pretrained_backbone",
    "backbone_checkpoint",
    "config_overrides",
    "image_size",
    "max_objects",
    "num_bins",
    "no_sequence_augmentation",
    "object_order",
    "coordinate_label_sigma",
    "auxiliary_loss_weight",
    "auxiliary_hints",
    "cross_attention_loss_weight",
    "coordinate_embedding_init",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "encoder_lr_scale",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "lr_scheduler_type",
    "num_warmup_steps",
    "seed",
)

# The default run on the synthetic set: this many epochs of 4000 images, or this many minutes, whichever ends first,
# at batch 8 (more updates in the minutes a CPU run has; larger sets get at most `training_plan.MAX_BATCH_SIZE`).
SYNTHETIC_EPOCHS = 10
SYNTHETIC_MINUTES = 13.5
SYNTHETIC_BATCH_SIZE = 8


def json_object(text: str) -> dict:
    """`--config_overrides`: a JSON object, or an error that shows what was given."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of config fields is needed, got {text!r}")
    return value


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=None, help="Hub id or local path of a HF dataset (default: synthetic).")
    data.add_argument("--dataset_config", default=None, help="Config name of the dataset.")
    data.add_argument("--train_split", default="train", help="Split of --dataset_name to train on.")
    data.add_argument(
        "--streaming",
        action="store_true",
        help="Read the training split of --dataset_name as a stream (Hub or local; nothing downloaded or prepared "
        "first), split between processes and DataLoader workers, shuffled with a buffer, its position saved in "
        "checkpoints. Needs --max_train_steps or --max_train_minutes.",
    )
    data.add_argument("--validation_split", default="validation", help="Split to evaluate on ('none' to skip).")
    data.add_argument("--bbox_format", default="auto", choices=["auto", "xywh", "xyxy"], help="Box format of the data.")
    data.add_argument("--coco_annotations", default=None, help="COCO json of the training images.")
    data.add_argument("--coco_images", default=None, help="Folder of the training images.")
    data.add_argument("--validation_coco_annotations", default=None, help="COCO json of the validation images.")
    data.add_argument("--validation_coco_images", default=None, help="Folder of the validation images.")
    data.add_argument("--synthetic_train_size", type=int, default=4000, help="Images in the synthetic train split.")
    data.add_argument(
        "--synthetic_validation_size", type=int, default=200, help="Images in the synthetic validation split."
    )
    data.add_argument(
        "--synthetic_variant",
        default="shapes",
        choices=sorted(SYNTHETIC_VARIANTS),
        help="The synthetic set: 'shapes' (128 px, 1-10 objects) or 'dense' (384 px, 20-60 small objects; train it "
        "with --image_size 384 --max_objects 64).",
    )
    data.add_argument("--max_train_samples", type=int, default=None, help="Train on the first N images only.")
    data.add_argument("--max_eval_samples", type=int, default=None, help="Evaluate on the first N images only.")
    data.add_argument(
        "--augmentation",
        default=None,
        choices=sorted(AUGMENTATION_PRESETS),
        help="Training augmentation (default: 'light' on the synthetic set, the official 'finetune' recipe otherwise).",
    )
    data.add_argument("--num_augmentations", type=int, default=1, help="Augmented copies of each image per batch (paper: 2).")
    data.add_argument(
        "--dataloader_num_workers", type=int, default=0, help="DataLoader worker processes (0: load in the main one)."
    )
    data.add_argument(
        "--check_images",
        default=None,
        choices=["none", "exists", "decode"],
        help="Check the images before training: 'exists' (files are there; the default for COCO json), 'decode' "
        "(every image decodes; reads them all), 'none' (the default for datasets).",
    )
    data.add_argument(
        "--on_bad_image",
        default="error",
        choices=["error", "skip"],
        help="A missing or undecodable image, found by --check_images or met while training: stop with an error "
        "naming it, or skip it (counted and logged).",
    )
    data.add_argument(
        "--annotation_cache_dir",
        default=None,
        help="Where a COCO json is kept once prepared (memory-mapped, shared by the processes of a machine). "
        "Default: pix2seq_annotations in the datasets cache (HF_DATASETS_CACHE).",
    )
    data.add_argument("--max_image_pixels", type=int, default=None, help=MAX_IMAGE_PIXELS_HELP)

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, help="A saved Pix2Seq model to fine-tune.")
    model.add_argument(
        "--config_preset",
        default="tiny",
        choices=sorted(PRESETS),
        help="Architecture of a new model (see docs/model.md); ignored with --model_name_or_path.",
    )
    model.add_argument("--pretrained_backbone", action="store_true", help="Start from ImageNet timm weights (Hub).")
    model.add_argument(
        "--backbone_checkpoint",
        default=None,
        help="A local file of timm backbone weights to start a new model from, instead of the Hub's (a timm model's "
        "state dict saved with safetensors or torch.save, e.g. the `model.safetensors` of a timm model; the backbone "
        "is the preset's or --config_overrides' `backbone`). Default: none (random weights, or --pretrained_backbone).",
    )
    model.add_argument(
        "--config_overrides",
        type=json_object,
        default=None,
        help='Other config fields of a new model, as JSON, e.g. \'{"decoder_layers": 4}\' or '
        '\'{"backbone_kwargs": {"out_indices": [2]}}\' (features at stride 8).',
    )
    model.add_argument("--image_size", type=int, default=None, help="Canvas size (default: the preset's).")
    model.add_argument(
        "--max_objects", type=int, default=None, help="Objects per image in a sequence (default: the preset's, 100)."
    )
    model.add_argument(
        "--num_bins", type=int, default=None, help="Coordinate quantisation bins (default: the preset's, 1000)."
    )
    model.add_argument(
        "--no_sequence_augmentation",
        action="store_true",
        help="Train on real objects then EOS, without the paper's noise objects (sequence augmentation).",
    )
    model.add_argument(
        "--object_order",
        default=None,
        choices=["random", "area", "dist2ori", "class"],
        help="Order of the objects in a training sequence (default: 'dist2ori' from scratch, the saved processor's "
        "when fine-tuning; the paper's is 'random'). See docs/training.md.",
    )
    model.add_argument(
        "--coordinate_label_sigma",
        type=float,
        default=None,
        help="Soft coordinate targets: Gaussian of this sigma in bins (0: one-hot, the paper). Default: the saved "
        "model's when fine-tuning, else the recipe's (see docs/training.md).",
    )
    model.add_argument(
        "--auxiliary_loss_weight",
        type=float,
        default=None,
        help="Weight of the auxiliary dense loss on the encoder output (0: none, the paper). Default: the saved "
        "model's when fine-tuning, else the recipe's (see docs/training.md).",
    )
    model.add_argument(
        "--auxiliary_hints",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Add the auxiliary head's box and class predictions to the decoder's memory (needs the auxiliary loss). "
        "Default: the saved model's when fine-tuning, else the recipe's, off (see docs/training.md).",
    )
    model.add_argument(
        "--cross_attention_loss_weight",
        type=float,
        default=None,
        help="Weight of the loss guiding the decoder's cross-attention to the object it writes (0: none, the paper). "
        "Default: the saved model's when fine-tuning, else the recipe's (see docs/training.md).",
    )
    model.add_argument(
        "--coordinate_embedding_init",
        default=None,
        choices=["normal", "sincos"],
        help="How a new model's coordinate-token embeddings start ('normal': the paper; 'sincos': position codes of "
        "their bins). Default: the recipe's (see docs/training.md).",
    )

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--recipe",
        default=None,
        choices=sorted(training_recipes.RECIPES),
        help="The paper's values for image size, augmentation, global batch (split over the processes), steps or "
        "epochs, learning rate and schedule (see 'Training at scale' in docs/training.md); options given "
        "explicitly override them.",
    )
    optim.add_argument(
        "--per_device_train_batch_size",
        type=int,
        default=None,
        help=f"Images per batch and process. Default: planned from the data, {training_plan.MAX_BATCH_SIZE} "
        f"({SYNTHETIC_BATCH_SIZE} on the synthetic set), halved while an epoch would have fewer than "
        f"{training_plan.MIN_STEPS_PER_EPOCH} steps (see 'How a run is planned' in docs/training.md).",
    )
    optim.add_argument("--per_device_eval_batch_size", type=int, default=64, help="Images per evaluation batch.")
    optim.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"Default: {training_setup.SCRATCH_LEARNING_RATE} from scratch, {training_setup.FINETUNE_LEARNING_RATE} "
        "when fine-tuning a saved model (--model_name_or_path; the paper's fine-tuning rate).",
    )
    optim.add_argument(
        "--encoder_lr_scale",
        type=float,
        default=None,
        help="Learning-rate factor of the Transformer encoder (input projection, layers, bridge; not the backbone). "
        "Default: 0.1 when training from scratch (no --model_name_or_path), else 1. See docs/training.md.",
    )
    optim.add_argument("--weight_decay", type=float, default=0.05, help="AdamW weight decay (the paper's 0.05).")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    optim.add_argument(
        "--adam_beta2",
        type=float,
        default=0.95,
        help="AdamW beta2: 0.95, the official Pix2Seq code's, in place of the usual 0.999 (a shorter average of "
        "squared gradients, steadier for Transformers trained at high learning rates).",
    )
    optim.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="Clip the gradient norm to this (0: no clipping)."
    )
    optim.add_argument(
        "--lr_scheduler_type",
        default="linear",
        help="A transformers scheduler name. With --max_train_minutes, `linear` (the default) decays to 0 at "
        "whichever ends first, the steps or the minutes; the others need a step count (--max_train_steps or "
        "--num_train_epochs).",
    )
    optim.add_argument(
        "--num_warmup_steps",
        type=int,
        default=None,
        help=f"Steps of linear warm-up from 0. Default: {training_plan.WARMUP_FRACTION * 100:g}%% of the planned steps "
        f"(at most {training_plan.MAX_WARMUP_STEPS}) and, with --max_train_minutes and the linear schedule, at most "
        f"{training_plan.WARMUP_FRACTION * 100:g}%% of the minutes, whichever ends first.",
    )
    optim.add_argument(
        "--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated into one optimizer step."
    )
    optim.add_argument(
        "--num_train_epochs",
        type=int,
        default=None,
        help=f"Default: {SYNTHETIC_EPOCHS} on the synthetic set ({SYNTHETIC_EPOCHS * 500} steps at batch 8, or "
        f"{SYNTHETIC_MINUTES} minutes, whichever ends first; see --max_train_minutes); otherwise as many as fit in "
        f"--max_train_minutes when only that is given, else {training_plan.DEFAULT_NUM_EPOCHS} but at least "
        f"{training_plan.MIN_PLANNED_STEPS} steps.",
    )
    optim.add_argument(
        "--max_train_steps", type=int, default=None, help="Optimizer updates to train (overrides --num_train_epochs)."
    )
    optim.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Stop (and evaluate/save) after this many minutes of the run, evaluations and the time before a resume "
        "included; alone (without --max_train_steps or --num_train_epochs), it decides how many steps the run makes. "
        "Default: none, except "
        f"{SYNTHETIC_MINUTES} on the synthetic set when neither --max_train_steps nor --num_train_epochs is given, so "
        "that the default run ends in about 15 minutes on a slow machine too.",
    )
    optim.add_argument("--seed", type=int, default=42, help="Seed of the initialisation, data order and augmentation.")

    run = parser.add_argument_group("run")
    run.add_argument(
        "--output_dir", default="outputs/pix2seq-synthetic", help="Where the model, checkpoints and results go."
    )
    run.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Start a new run in an --output_dir that holds a model or checkpoints of another run (its checkpoints are "
        "removed; its model is replaced at the end).",
    )
    run.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch threads per process on the CPU (default: the usable cores divided by the processes on this machine; "
        "`accelerate launch` sets OMP_NUM_THREADS=1, which would leave one core working).",
    )
    run.add_argument(
        "--cpu",
        action="store_true",
        help="Train on the CPU even if a GPU is there (automatic for several processes on a machine without CUDA).",
    )
    run.add_argument(
        "--mixed_precision",
        default="auto",
        choices=["auto", "no", "fp16", "bf16"],
        help="Autocast precision of the forward passes. 'auto': Accelerate's setting (`accelerate launch "
        "--mixed_precision`, its config), and where that is 'no', bf16 on a CPU with bf16 matrix units (Intel AMX), "
        "about 1.4x faster there; 'no' trains in float32 everywhere.",
    )
    run.add_argument("--checkpointing_steps", default=None, help="Save state every N steps, or 'epoch'.")
    run.add_argument(
        "--logging_steps",
        type=int,
        default=50,
        help="When the output is not a terminal (e.g. a log file), no progress bar: log the loss every N steps.",
    )
    run.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="Keep only the newest K checkpoints (default: all)."
    )
    run.add_argument(
        "--resume_from_checkpoint",
        default=None,
        help="A step_N checkpoint folder, or 'latest' (the newest complete one in --output_dir).",
    )
    run.add_argument(
        "--eval_steps",
        type=int,
        default=None,
        help="Evaluate every N steps (default: 1000 on the synthetic set, else at the end).",
    )
    run.add_argument("--eval_top_p", type=float, default=None, help="Sampling mass at evaluation (default: greedy).")
    run.add_argument("--num_visualizations", type=int, default=8, help="Validation images drawn at the end.")
    run.add_argument("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    run.add_argument("--report_to", default="tensorboard", help="Accelerate trackers for --with_tracking ('all').")
    run.add_argument(
        "--push_to_hub", action="store_true", help="Upload the model, processor and a model card to the Hub."
    )
    run.add_argument(
        "--hub_model_id", default=None, help="Hub repository of --push_to_hub (unset: the name of --output_dir)."
    )
    run.add_argument(
        "--hub_strategy",
        default="end",
        choices=["end", "every_save"],
        help="With --push_to_hub: upload at the end only, or also the model at every checkpoint.",
    )
    # A recipe's values become the defaults, so that options given on the command line win.
    known, _ = parser.parse_known_args(argv)
    if known.recipe is not None:
        parser.set_defaults(
            **training_recipes.recipe_defaults(
                known.recipe, None, known.gradient_accumulation_steps, known.per_device_train_batch_size
            )
        )
    args = parser.parse_args(argv)
    if args.num_augmentations < 1:
        parser.error("--num_augmentations must be at least 1")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num_threads must be at least 1, got {args.num_threads}")
    if args.encoder_lr_scale is not None and not args.encoder_lr_scale > 0:
        parser.error(f"--encoder_lr_scale must be positive, got {args.encoder_lr_scale}")
    if (args.coco_annotations is None) != (args.coco_images is None):
        parser.error("--coco_annotations and --coco_images go together")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(
                f"--checkpointing_steps must be a positive integer or 'epoch', got {args.checkpointing_steps!r}"
            )
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be at least 1, got {args.checkpoints_total_limit}")
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        parser.error("--overwrite_output_dir starts a new run and --resume_from_checkpoint continues one: pass one")
    if args.streaming:
        if not args.dataset_name:
            parser.error("--streaming reads --dataset_name (a Hub dataset or a local folder); none was given")
        if args.max_train_steps is None and args.max_train_minutes is None:
            parser.error(
                "--streaming needs --max_train_steps or --max_train_minutes: a stream has no length to count epochs in"
            )
        if args.max_train_samples is not None:
            parser.error("--max_train_samples reads the head of a split, which a shuffled stream has not: drop it")
    return args


def build_model_and_processor(args, id2label: dict[int, str]):
    """The model (a preset or a saved model) and a processor whose token layout matches it."""
    return training_setup.build_model_and_processor(
        id2label,
        model_name_or_path=args.model_name_or_path,
        config_preset=args.config_preset,
        pretrained_backbone=args.pretrained_backbone,
        backbone_checkpoint=args.backbone_checkpoint,
        image_size=args.image_size,
        max_objects=args.max_objects,
        num_bins=args.num_bins,
        object_order=args.object_order,
        sequence_augmentation=not args.no_sequence_augmentation,
        coordinate_label_sigma=args.coordinate_label_sigma,
        auxiliary_loss_weight=args.auxiliary_loss_weight,
        auxiliary_hints=args.auxiliary_hints,
        cross_attention_loss_weight=args.cross_attention_loss_weight,
        coordinate_embedding_init=args.coordinate_embedding_init,
        config_overrides=args.config_overrides,
    )


def learning_rates(args) -> tuple[float, float]:
    """
    The learning rate and the encoder's factor of a run: `--learning_rate` / `--encoder_lr_scale` where given, else
    `training_setup`'s defaults for a run from scratch or a fine-tuning run (`--model_name_or_path`).

    Returns:
        `(learning_rate, encoder_lr_scale)`
    """
    learning_rate = args.learning_rate
    if learning_rate is None:
        learning_rate = training_setup.default_learning_rate(args.model_name_or_path)
    encoder_lr_scale = args.encoder_lr_scale
    if encoder_lr_scale is None:
        encoder_lr_scale = training_setup.default_encoder_lr_scale(args.model_name_or_path)
    return learning_rate, encoder_lr_scale


def build_optimizer(model: torch.nn.Module, args, device: torch.device) -> torch.optim.Optimizer:
    """
    AdamW over `training_setup.optimizer_param_groups` (the encoder at `args.encoder_lr_scale`), as one fused kernel
    on the CPU and CUDA (on the CPU its per-tensor loop otherwise costs about 7% of a step of the `tiny` preset).
    """
    groups = training_setup.optimizer_param_groups(model, args.learning_rate, args.weight_decay, args.encoder_lr_scale)
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), fused=fused)


def plan_run(args, num_images: int, num_processes: int, synthetic: bool) -> training_plan.TrainingPlan:
    """
    Plans the run (`training_plan.plan_training`) from the training images and the budget, keeping every value given,
    and writes the planned batch size, steps and warm-up back into `args`.
    """
    plan = training_plan.plan_training(
        num_images,
        per_device_batch_size=args.per_device_train_batch_size,
        num_epochs=args.num_train_epochs,
        max_train_steps=args.max_train_steps,
        max_train_minutes=args.max_train_minutes,
        num_warmup_steps=args.num_warmup_steps,
        num_processes=num_processes,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        lr_scheduler_type=args.lr_scheduler_type,
        max_batch_size=SYNTHETIC_BATCH_SIZE if synthetic else training_plan.MAX_BATCH_SIZE,
    )
    args.per_device_train_batch_size, args.max_train_steps = plan.per_device_batch_size, plan.max_train_steps
    given_warmup, steps = args.num_warmup_steps, plan.max_train_steps
    if given_warmup is not None and steps and given_warmup > 0.1 * steps:
        logger.warning(
            f"--num_warmup_steps {given_warmup} is more than 10% of the {steps} planned steps: "
            "the learning rate stays low for much of the run."
        )
    args.num_warmup_steps = plan.warmup_steps
    return plan


def build_scheduler(optimizer, args, num_processes: int, plan: training_plan.TrainingPlan):
    """
    The learning-rate schedule of `plan`: `linear` runs `training_setup.LinearDecayToBudget` (warm-up ended by the
    planned steps or minutes, decay to 0 at whichever budget ends first); any other `args.lr_scheduler_type` is
    transformers'. Accelerate steps the scheduler once per process, hence the step counts times `num_processes`.

    Returns:
        `(scheduler, budget)`: `budget` is the `LinearDecayToBudget` the loop reports the elapsed time to, or `None`.
    """
    num_warmup_steps = plan.warmup_steps * num_processes
    num_training_steps = plan.max_train_steps * num_processes if plan.max_train_steps is not None else None
    if args.lr_scheduler_type == "linear":
        seconds = {"budget_seconds": plan.max_train_minutes, "warmup_seconds": plan.warmup_minutes}
        seconds = {name: None if value is None else value * 60 for name, value in seconds.items()}
        budget = training_setup.LinearDecayToBudget(num_warmup_steps, num_training_steps, **seconds)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, budget), budget
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=num_warmup_steps,
        num_training_steps=num_training_steps,
    )
    return scheduler, None


def warmup_end_step(budget, plan: training_plan.TrainingPlan, completed_steps: int, num_processes: int) -> int | None:
    """
    The training steps the warm-up lasted: the updates after it run at the full learning rate. `None` when the run
    ended before its warm-up did.
    """
    if budget is None:
        return plan.warmup_steps if plan.warmup_steps <= completed_steps else None
    if budget.warmup_ended_at is None:
        return None
    # Accelerate steps the scheduler once per process and update.
    return math.ceil(budget.warmup_ended_at / num_processes)


def push_to_hub(model, processor, args, metrics=None, commit_message="Upload Pix2Seq model"):
    """Uploads the model with its code and a model card to `--hub_model_id` (default: the output folder's name)."""
    dataset = args.dataset_name if args.dataset_name and not os.path.exists(args.dataset_name) else None
    source = args.dataset_name or args.coco_annotations or "the built-in synthetic shapes set"
    hub.push_model(
        model,
        processor,
        args.output_dir,
        args.hub_model_id or Path(args.output_dir).name,
        commit_message=commit_message,
        metrics=metrics,
        dataset=dataset,
        dataset_description=source,
        base_model=args.model_name_or_path,
        training_arguments=vars(args),
    )


def run_arguments(args, accelerator) -> dict:
    """The values that define a run (recorded in each checkpoint and compared on resume), defaults resolved."""
    run = {name: getattr(args, name, None) for name in RUN_ARGUMENTS}
    run["world_size"] = accelerator.num_processes
    return run


def run_evaluation(accelerator, model, processor, dataloader, args) -> dict:
    generation_kwargs = {"do_sample": False} if args.eval_top_p is None else {"do_sample": True, "top_p": args.eval_top_p}
    model.eval()
    metrics = evaluate_model(
        accelerator.unwrap_model(model),
        processor,
        dataloader,
        generation_kwargs=generation_kwargs,
        accelerator=accelerator,
        progress_bar=True,
    )
    model.train()
    return {key: float(metrics[key]) for key in METRIC_KEYS}


def save_visualizations(model, processor, dataset, args, output_dir: Path) -> list[str]:
    """Draws the detections of the first validation images into `output_dir/detections/` (bad images are skipped)."""
    folder = output_dir / "detections"
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    paths = []
    count = min(args.num_visualizations, len(dataset))
    dataset = undecoded_images(dataset)
    for index in range(count):
        example = dataset[index]
        try:
            record = f"image_id {example['image_id']}"
            image = to_rgb(decode_image(example["image"], record), record)
        except ImageReadError as error:
            logger.warning(f"No picture: {error}")
            continue
        inputs = processor(images=image, return_tensors="pt").to(model.device)
        with torch.no_grad():
            outputs = model.generate(inputs["pixel_values"], do_sample=False)
        found = processor.post_process_object_detection(
            outputs, threshold=0.3, target_sizes=[(image.height, image.width)]
        )[0]
        path = folder / f"{example['image_id']}.png"
        draw_detections(image, {k: v.cpu() for k, v in found.items()}, model.config.id2label).save(path)
        paths.append(str(path))
    return paths


def main(argv=None) -> int:
    args = parse_args(argv)
    # One run per output folder (a second one is refused, naming this one); Ctrl-C / SIGTERM stop after a checkpoint.
    with hold_output_dir(args.output_dir), StopOnSignal() as interrupt:
        return train(args, interrupt)


def train(args, interrupt: StopOnSignal) -> int:
    """Runs the training `args` describe; returns the exit status (`interrupt.exit_code` when a signal stopped it)."""
    output_dir = Path(args.output_dir)
    if args.max_image_pixels is not None:
        set_max_image_pixels(args.max_image_pixels)
    # Accelerate only sets up gloo between CPU processes (torchrun, `accelerate launch --multi_gpu`) when told `cpu=True`.
    use_cpu = args.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
        if mixed_precision == "no":
            on_cpu = use_cpu or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.accelerator.is_available()
            mixed_precision = training_setup.default_mixed_precision(on_cpu)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # A sampler seeded per epoch gives the same data order after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if not sys.stderr.isatty():  # a log file gets lines, not the redraws of progress bars
        datasets.disable_progress_bars()
        transformers.utils.logging.disable_progress_bar()
    # Before anything is written: a folder holding another run is refused, or (--overwrite_output_dir) cleared of its
    # checkpoints so that `latest` can never resume them.
    earlier_checkpoints = check_output_dir(output_dir, args.overwrite_output_dir, bool(args.resume_from_checkpoint))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        remove_checkpoints(earlier_checkpoints)
        output_dir.mkdir(parents=True, exist_ok=True)
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    threads = ""
    if accelerator.device.type == "cpu":
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        torch.set_num_threads(args.num_threads or max(1, len(os.sched_getaffinity(0)) // local_processes))
        threads = f", {torch.get_num_threads()} threads"
    logger.info(
        f"Distributed: {accelerator.distributed_type}, world size {accelerator.num_processes}, "
        f"process {accelerator.process_index}, device {accelerator.device}{threads}, mixed precision "
        f"{accelerator.mixed_precision}",
        main_process_only=False,
    )
    set_seed(args.seed)

    # Data: every process builds the same splits (the synthetic set is deterministic from the seed).
    with accelerator.main_process_first():
        if args.streaming:
            train_dataset, eval_dataset = load_streaming_splits(
                args.dataset_name, args.dataset_config, args.train_split, args.validation_split, args.bbox_format,
                args.max_eval_samples, args.check_images or "none", args.on_bad_image, accelerator.process_index,
                accelerator.num_processes, args.seed,
            )  # fmt: skip
            id2label = train_dataset.id2label
        else:
            splits = load_detection_splits(args)
            train_dataset, eval_dataset, id2label = splits.train, splits.validation, splits.id2label
    num_train_images = train_dataset.num_examples if args.streaming else len(train_dataset)
    if num_train_images is None:
        raise ValueError(
            f"The stream of {args.dataset_name!r} ({args.train_split}) does not say how many examples it has (its "
            "dataset info has no split sizes), which the run's plan needs; train without --streaming."
        )
    logger.info(f"Train: {num_train_images} images; validation: {len(eval_dataset) if eval_dataset else 0}; {id2label}")

    model, processor = build_model_and_processor(args, id2label)
    logger.info(f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    canvas = processor.image_processor.size["longest_edge"]
    synthetic = not (args.dataset_name or args.coco_annotations)
    if args.augmentation is None:
        args.augmentation = "light" if synthetic else "finetune"
    if synthetic and args.max_train_minutes is None and args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_minutes = SYNTHETIC_MINUTES
    if args.num_train_epochs is None and synthetic:
        args.num_train_epochs = SYNTHETIC_EPOCHS
    plan = plan_run(args, num_train_images, accelerator.num_processes, synthetic)
    if args.eval_steps is None and synthetic:
        args.eval_steps = 1000
    args.learning_rate, args.encoder_lr_scale = learning_rates(args)
    train_collator = Pix2SeqCollator(
        processor,
        transforms=build_train_transforms(args.augmentation, canvas),
        training=True,
        num_augmentations=args.num_augmentations,
        seed=args.seed,
        on_bad_image=args.on_bad_image,
    )
    eval_collator = Pix2SeqCollator(processor, training=False, on_bad_image=args.on_bad_image)
    # The collators decode the images themselves, so that a bad one met mid-run is named (file, image id) or skipped.
    if args.streaming:
        train_dataloader = StreamingDataLoader(
            train_dataset, args.per_device_train_batch_size, train_collator, args.dataloader_num_workers,
            accelerator.device,
        )  # fmt: skip
        accelerator.register_for_checkpointing(train_dataloader)
    else:
        train_dataloader = DataLoader(
            undecoded_images(train_dataset),
            batch_size=args.per_device_train_batch_size,
            shuffle=True,
            collate_fn=train_collator,
            num_workers=args.dataloader_num_workers,
        )
    eval_dataloader = None
    if eval_dataset is not None:
        eval_dataloader = DataLoader(
            undecoded_images(eval_dataset),
            batch_size=args.per_device_eval_batch_size,
            collate_fn=eval_collator,
            num_workers=0,
        )

    if accelerator.device.type == "cpu":
        training_setup.speed_up_cpu_training(model, accelerator.mixed_precision)
    optimizer = build_optimizer(model, args, accelerator.device)
    # Without an epoch count (only --max_train_minutes) the minutes end the run.
    updates_per_epoch, num_epochs = plan.steps_per_epoch, plan.num_epochs or sys.maxsize
    scheduler, budget = build_scheduler(optimizer, args, accelerator.num_processes, plan)
    if args.streaming:  # each process reads its own part of the stream
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
        updates_per_epoch, num_epochs = sys.maxsize, sys.maxsize
    else:
        model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    if eval_dataloader is not None:
        eval_dataloader = accelerator.prepare(eval_dataloader)

    if args.with_tracking:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("pix2seq", tracked)

    run = run_arguments(args, accelerator)
    completed_steps, starting_epoch, resume_batches, resumed_seconds = 0, 0, 0, 0.0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        state = read_training_state(checkpoint)
        check_same_run(checkpoint, state, run)
        accelerator.load_state(str(checkpoint))
        completed_steps = state["completed_steps"]
        resumed_seconds = float(state.get("elapsed_seconds", 0.0))
        starting_epoch = completed_steps // updates_per_epoch
        resume_batches = (completed_steps % updates_per_epoch) * args.gradient_accumulation_steps
        if args.streaming:  # the stream's saved position says where to go on
            starting_epoch, resume_batches = train_dataloader.dataset.epoch, 0
        logger.info(f"Resumed from {checkpoint} at step {completed_steps} (epoch {starting_epoch}).")
        if args.max_train_steps is not None and completed_steps >= args.max_train_steps:
            logger.warning(
                f"{checkpoint} is at step {completed_steps}, not before --max_train_steps {args.max_train_steps}: "
                "nothing left to train; evaluating and saving its model."
            )
            starting_epoch = num_epochs

    logger.info(
        f"{plan.describe()} Training at learning rate {args.learning_rate}, x{args.num_augmentations} augmentations."
    )
    # `disable=None`: tqdm draws its bar on a terminal only; elsewhere the loss is logged every `logging_steps`.
    progress = tqdm(
        total=args.max_train_steps,
        initial=completed_steps,
        disable=None if accelerator.is_local_main_process else True,
    )
    log_steps = progress.disable and accelerator.is_local_main_process and args.logging_steps > 0
    history, start_time, stop = [], time.time(), False

    def elapsed_seconds() -> float:
        """Wall time of the whole run: this launch's and, when resumed, the checkpoint's."""
        return resumed_seconds + time.time() - start_time

    eval_seconds = 0.0  # time spent in evaluations during training, left out of `train_minutes` in the history
    running_loss, running_count, loss = 0.0, 0, None
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        train_collator.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == starting_epoch and resume_batches:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in batches:
            if budget is not None:
                budget.set_elapsed(elapsed_seconds())
            with accelerator.accumulate(model):
                outputs = model(
                    pixel_values=batch["pixel_values"],
                    decoder_input_ids=batch["decoder_input_ids"],
                    labels=batch["labels"],
                )
                accelerator.backward(outputs.loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            running_loss += outputs.loss.detach().float().item()
            running_count += 1
            if not accelerator.sync_gradients:
                continue
            completed_steps += 1
            progress.update(1)
            loss = running_loss / running_count
            running_loss, running_count = 0.0, 0
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if log_steps and (completed_steps % args.logging_steps == 0 or completed_steps == args.max_train_steps):
                learning_rate = scheduler.get_last_lr()[0]
                of_steps = f"/{args.max_train_steps}" if args.max_train_steps else ""
                logger.info(f"step {completed_steps}{of_steps}: loss {loss:.4f}, lr {learning_rate:.2e}")
            if args.with_tracking:
                accelerator.log({"train/loss": loss, "train/lr": scheduler.get_last_lr()[0]}, step=completed_steps)
            if args.checkpointing_steps and args.checkpointing_steps.isdigit():
                if completed_steps % int(args.checkpointing_steps) == 0:
                    save_checkpoint(
                        accelerator, output_dir, completed_steps, run, args.checkpoints_total_limit,
                        elapsed_seconds=elapsed_seconds(),
                    )  # fmt: skip
                    if args.push_to_hub and args.hub_strategy == "every_save" and accelerator.is_main_process:
                        push_to_hub(
                            accelerator.unwrap_model(model), processor, args,
                            commit_message=f"Training in progress, step {completed_steps}",
                        )  # fmt: skip
            if interrupt.should_stop(accelerator):
                save_checkpoint(
                    accelerator, output_dir, completed_steps, run, args.checkpoints_total_limit,
                    elapsed_seconds=elapsed_seconds(),
                )  # fmt: skip
                logger.warning(
                    f"Interrupted: stopped after step {completed_steps}, saved in {output_dir / f'step_{completed_steps}'}"
                    ". To go on, run the same command with --resume_from_checkpoint latest (without "
                    "--overwrite_output_dir)."
                )
                return interrupt.exit_code
            out_of_time = args.max_train_minutes and elapsed_seconds() / 60 >= args.max_train_minutes
            last_step = out_of_time or (args.max_train_steps is not None and completed_steps >= args.max_train_steps)
            if eval_dataloader is not None and args.eval_steps and completed_steps % args.eval_steps == 0 and not last_step:
                eval_start = time.time()
                metrics = run_evaluation(accelerator, model, processor, eval_dataloader, args)
                eval_seconds += time.time() - eval_start
                minutes = (time.time() - start_time) / 60
                history.append(
                    {
                        "step": completed_steps,
                        "loss": loss,
                        "minutes": minutes,
                        "train_minutes": minutes - eval_seconds / 60,
                        **metrics,
                    }
                )
                logger.info(f"step {completed_steps}: loss {loss:.4f} " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
                if args.with_tracking:
                    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
            if last_step:
                stop = True
                break
        if args.checkpointing_steps == "epoch":
            save_checkpoint(
                accelerator, output_dir, completed_steps, run, args.checkpoints_total_limit,
                elapsed_seconds=elapsed_seconds(),
            )  # fmt: skip
        if stop:
            break
    progress.close()
    train_minutes = (time.time() - start_time) / 60

    results = {
        "train_steps": completed_steps,
        "train_minutes": round(train_minutes, 2),
        "world_size": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        # The plan, and after how many steps the warm-up actually ended.
        "plan": {
            **plan.to_dict(),
            "warmup_ended_at_step": warmup_end_step(budget, plan, completed_steps, accelerator.num_processes),
        },
    }
    skipped = torch.tensor(train_collator.stats["skipped_bad_images"], device=accelerator.device)
    skipped = int(accelerator.reduce(skipped, "sum"))
    if skipped:
        # Counted where the batches are collated: with --dataloader_num_workers, in the workers (see their warnings).
        logger.warning(f"Skipped {skipped} unreadable training images (--on_bad_image skip).")
    results["skipped_bad_images"] = skipped
    if eval_dataloader is not None:
        metrics = run_evaluation(accelerator, model, processor, eval_dataloader, args)
        history.append(
            {
                "step": completed_steps,
                "loss": loss,
                "minutes": train_minutes,
                "train_minutes": train_minutes - eval_seconds / 60,
                **metrics,
            }
        )
        logger.info("Final: " + " ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        if args.with_tracking:
            accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=completed_steps)
        results.update(metrics)
    results["history"] = history

    accelerator.wait_for_everyone()
    if args.with_tracking:
        accelerator.end_training()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        if eval_dataset is not None and args.num_visualizations:
            results["visualizations"] = save_visualizations(unwrapped, processor, eval_dataset, args, output_dir)

        def write_model(folder: Path) -> None:
            unwrapped.save_pretrained(folder)
            processor.save_pretrained(folder)
            (folder / "all_results.json").write_text(json.dumps(results, indent=2))

        # Written beside and then moved in: a kill while saving never leaves a half-written model in place.
        write_files_atomically(output_dir, write_model)
        logger.info(f"Saved the model, the processor and all_results.json in {output_dir}")
        if args.push_to_hub:
            push_to_hub(unwrapped, processor, args, metrics=results, commit_message="End of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
