"""Train (or fine-tune) Pix2Seq with Accelerate on HF `datasets`, evaluate with COCO mAP, save a loadable model.

With no arguments it trains the small `tiny` model on the built-in synthetic shapes set on the CPU and reports mAP:

    accelerate launch --num_processes 1 examples/train.py

Other data:

    # a dataset on the Hub or on disk, CPPE-5 style (objects.bbox in COCO xywh) or an xyxy repackaging of COCO
    accelerate launch examples/train.py --dataset_name cppe-5 --config_preset r50 --pretrained_backbone
    # a local COCO json + image folder (COCO 2017, Objects365, any COCO-style set)
    accelerate launch examples/train.py --coco_annotations ann/instances_train2017.json --coco_images train2017 \
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
import re
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import pix2seq_hf  # noqa: F401  (registers the Auto classes)
from pix2seq_hf import Pix2SeqConfig, Pix2SeqForObjectDetection, Pix2SeqImageProcessor, Pix2SeqProcessor
from pix2seq_hf.data import (
    AUGMENTATION_PRESETS,
    SYNTHETIC_VARIANTS,
    Pix2SeqCollator,
    build_train_transforms,
    load_detection_splits,
)
from pix2seq_hf.evaluation import METRIC_KEYS, evaluate_model
from pix2seq_hf.presets import PRESETS, get_preset_config, get_preset_image_processor_kwargs
from pix2seq_hf.visualization import draw_detections


logger = get_logger(__name__)

# The default run on the synthetic set: this many epochs of 4000 images, or this many minutes, whichever ends first.
SYNTHETIC_EPOCHS = 10
SYNTHETIC_MINUTES = 12.0
SCRATCH_LEARNING_RATE = 1e-3
FINETUNE_LEARNING_RATE = 3e-5
# Training-loss options beyond the paper, on by default from scratch where they measurably help (docs/training.md).
SCRATCH_RECIPE = {"object_order": "dist2ori", "coordinate_label_sigma": 0.0, "auxiliary_loss_weight": 0.0}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_name", default=None, help="Hub id or local path of a HF dataset (default: synthetic).")
    data.add_argument("--dataset_config", default=None, help="Config name of the dataset.")
    data.add_argument("--train_split", default="train")
    data.add_argument("--validation_split", default="validation", help="Split to evaluate on ('none' to skip).")
    data.add_argument("--bbox_format", default="auto", choices=["auto", "xywh", "xyxy"], help="Box format of the data.")
    data.add_argument("--coco_annotations", default=None, help="COCO json of the training images.")
    data.add_argument("--coco_images", default=None, help="Folder of the training images.")
    data.add_argument("--validation_coco_annotations", default=None, help="COCO json of the validation images.")
    data.add_argument("--validation_coco_images", default=None, help="Folder of the validation images.")
    data.add_argument("--synthetic_train_size", type=int, default=4000, help="Images in the synthetic train split.")
    data.add_argument("--synthetic_validation_size", type=int, default=200)
    data.add_argument(
        "--synthetic_variant",
        default="shapes",
        choices=sorted(SYNTHETIC_VARIANTS),
        help="The synthetic set: 'shapes' (128 px, 1-10 objects) or 'dense' (384 px, 20-60 small objects; train it "
        "with --image_size 384 --max_objects 64).",
    )
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--max_eval_samples", type=int, default=None)
    data.add_argument(
        "--augmentation",
        default=None,
        choices=sorted(AUGMENTATION_PRESETS),
        help="Training augmentation (default: 'light' on the synthetic set, the official 'finetune' recipe otherwise).",
    )
    data.add_argument("--num_augmentations", type=int, default=1, help="Augmented copies of each image per batch (paper: 2).")
    data.add_argument("--dataloader_num_workers", type=int, default=0)

    model = parser.add_argument_group("model")
    model.add_argument("--model_name_or_path", default=None, help="A saved Pix2Seq model to fine-tune.")
    model.add_argument("--config_preset", default="tiny", choices=sorted(PRESETS))
    model.add_argument("--pretrained_backbone", action="store_true", help="Start from ImageNet timm weights (Hub).")
    model.add_argument("--image_size", type=int, default=None, help="Canvas size (default: the preset's).")
    model.add_argument("--max_objects", type=int, default=None)
    model.add_argument("--num_bins", type=int, default=None)
    model.add_argument("--no_sequence_augmentation", action="store_true")
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

    optim = parser.add_argument_group("optimisation")
    optim.add_argument(
        "--per_device_train_batch_size", type=int, default=None, help="Default: 8 on the synthetic set, else 32."
    )
    optim.add_argument("--per_device_eval_batch_size", type=int, default=64)
    optim.add_argument(
        "--learning_rate",
        type=float,
        default=None,
        help=f"Default: {SCRATCH_LEARNING_RATE} from scratch, {FINETUNE_LEARNING_RATE} when fine-tuning a saved model "
        "(--model_name_or_path; the paper's fine-tuning rate).",
    )
    optim.add_argument(
        "--encoder_lr_scale",
        type=float,
        default=None,
        help="Learning-rate factor of the Transformer encoder (input projection, layers, bridge; not the backbone). "
        "Default: 0.1 when training from scratch (no --model_name_or_path), else 1. See docs/training.md.",
    )
    optim.add_argument("--weight_decay", type=float, default=0.05)
    optim.add_argument("--adam_beta1", type=float, default=0.9)
    optim.add_argument("--adam_beta2", type=float, default=0.95)
    optim.add_argument("--max_grad_norm", type=float, default=1.0)
    optim.add_argument(
        "--lr_scheduler_type",
        default=None,
        help="A transformers scheduler name (default: constant_with_warmup on the synthetic set, else linear).",
    )
    optim.add_argument("--num_warmup_steps", type=int, default=100)
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1)
    optim.add_argument(
        "--num_train_epochs",
        type=int,
        default=None,
        help=f"Default: {SYNTHETIC_EPOCHS} on the synthetic set ({SYNTHETIC_EPOCHS * 500} steps at batch 8, or "
        f"{SYNTHETIC_MINUTES} minutes, whichever ends first; see --max_train_minutes), 50 otherwise.",
    )
    optim.add_argument("--max_train_steps", type=int, default=None, help="Overrides --num_train_epochs.")
    optim.add_argument(
        "--max_train_minutes",
        type=float,
        default=None,
        help="Stop (and evaluate/save) after this many minutes, evaluations included. Default: none, except "
        f"{SYNTHETIC_MINUTES} on the synthetic set when neither --max_train_steps nor --num_train_epochs is given, so "
        "that the default run ends in about 15 minutes on a slow machine too.",
    )
    optim.add_argument("--seed", type=int, default=42)

    run = parser.add_argument_group("run")
    run.add_argument("--output_dir", default="outputs/pix2seq-synthetic")
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
    run.add_argument("--checkpointing_steps", default=None, help="Save state every N steps, or 'epoch'.")
    run.add_argument("--resume_from_checkpoint", default=None, help="A checkpoint folder, or 'latest'.")
    run.add_argument(
        "--eval_steps",
        type=int,
        default=None,
        help="Evaluate every N steps (default: 1000 on the synthetic set, else at the end).",
    )
    run.add_argument("--eval_top_p", type=float, default=None, help="Sampling mass at evaluation (default: greedy).")
    run.add_argument("--num_visualizations", type=int, default=8, help="Validation images drawn at the end.")
    run.add_argument("--with_tracking", action="store_true", help="Log to the trackers of --report_to.")
    run.add_argument("--report_to", default="tensorboard")
    run.add_argument("--push_to_hub", action="store_true")
    run.add_argument("--hub_model_id", default=None)
    args = parser.parse_args(argv)
    if args.num_augmentations < 1:
        parser.error("--num_augmentations must be at least 1")
    if args.num_threads is not None and args.num_threads < 1:
        parser.error(f"--num_threads must be at least 1, got {args.num_threads}")
    if args.encoder_lr_scale is not None and not args.encoder_lr_scale > 0:
        parser.error(f"--encoder_lr_scale must be positive, got {args.encoder_lr_scale}")
    if (args.coco_annotations is None) != (args.coco_images is None):
        parser.error("--coco_annotations and --coco_images go together")
    return args


def relabel_model(model: Pix2SeqForObjectDetection, id2label: dict[int, str]) -> None:
    """
    Points a saved model at a new label set: label `i` becomes class token `class_token_offset + i` (class tokens share
    the vocabulary, so no weight changes shape; tokens of the old classes are simply reused). The auxiliary dense head,
    if any, is sized per class and is rebuilt for the new classes.

    Raises:
        `ValueError` when the new classes do not fit between the class and coordinate token ranges.
    """
    config = model.config
    room = config.coord_token_offset - config.class_token_offset
    if len(id2label) > room:
        raise ValueError(
            f"The data has {len(id2label)} classes, but the model's vocabulary has room for {room} class tokens "
            f"({config.class_token_offset}..{config.coord_token_offset - 1})."
        )
    old = dict(config.id2label)
    config.num_classes = len(id2label)
    config.id2label = dict(id2label)
    config.label2id = {name: label for label, name in id2label.items()}
    if getattr(model, "auxiliary_head", None) is not None:
        model.auxiliary_head = type(model.auxiliary_head)(config)
        model.auxiliary_head.apply(model._init_weights)
    model._box_codec = None
    tokens = ", ".join(f"{name} -> {config.class_token_offset + label}" for label, name in sorted(id2label.items()))
    logger.info(f"Fine-tuning onto a new label set (the model was trained on {old}); class tokens: {tokens}.")


def build_model_and_processor(args, id2label: dict[int, str]):
    """
    The model and a processor whose token layout matches it: a saved model (`--model_name_or_path`; moved onto the
    data's label set when it differs, see `relabel_model`) or a preset trained from scratch.
    """
    if args.model_name_or_path:
        model = Pix2SeqForObjectDetection.from_pretrained(args.model_name_or_path)
        saved = Pix2SeqProcessor.from_pretrained(args.model_name_or_path)
        for name in ("coordinate_label_sigma", "auxiliary_loss_weight"):
            if getattr(args, name) is not None and getattr(args, name) != getattr(model.config, name):
                raise ValueError(
                    f"--{name} {getattr(args, name)} differs from the saved model's {getattr(model.config, name)}; "
                    "fine-tuning keeps the saved model's training losses."
                )
        if dict(model.config.id2label) != dict(id2label):
            relabel_model(model, id2label)
        image_processor = saved.image_processor
        if args.image_size:
            image_processor.size = {"longest_edge": args.image_size}
        processor = Pix2SeqProcessor.from_config(
            model.config,
            image_processor=image_processor,
            **{
                **saved.codec_options,
                **({"object_order": args.object_order} if args.object_order else {}),
                **({"sequence_augmentation": False} if args.no_sequence_augmentation else {}),
            },
        )
    else:
        overrides = {"id2label": id2label, "use_pretrained_backbone": args.pretrained_backbone}
        if args.max_objects:
            overrides["max_objects"] = args.max_objects
            overrides["max_position_embeddings"] = max(512, 5 * args.max_objects + 1)
        if args.num_bins:
            overrides["num_bins"] = args.num_bins
            overrides["vocab_size"] = max(3000, 1000 + args.num_bins)
        for name in ("coordinate_label_sigma", "auxiliary_loss_weight"):
            overrides[name] = SCRATCH_RECIPE[name] if getattr(args, name) is None else getattr(args, name)
        config = get_preset_config(args.config_preset, **overrides)
        model = Pix2SeqForObjectDetection(config)
        # The weights now live in the model: a saved config must not download the backbone again when loaded.
        model.config.use_pretrained_backbone = False
        image_processor = Pix2SeqImageProcessor(**get_preset_image_processor_kwargs(args.config_preset, args.image_size))
        processor = Pix2SeqProcessor.from_config(
            model.config,
            image_processor=image_processor,
            object_order=args.object_order or SCRATCH_RECIPE["object_order"],
            sequence_augmentation=not args.no_sequence_augmentation,
        )
    processor.check_model_compatible(model)
    logger.info(
        f"Object order {processor.object_order}, sequence augmentation {processor.sequence_augmentation}, "
        f"coordinate_label_sigma {model.config.coordinate_label_sigma}, "
        f"auxiliary_loss_weight {model.config.auxiliary_loss_weight}"
    )
    return model, processor


def build_optimizer(model: torch.nn.Module, args) -> torch.optim.Optimizer:
    """
    AdamW with weight decay on weight matrices and kernels only (no biases, norms, embeddings of positions), at
    `args.learning_rate`, except the Transformer encoder (the parameters of `model.model.encoder` outside its backbone),
    which learns at `args.learning_rate * args.encoder_lr_scale`.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = not (parameter.ndim < 2 or "norm" in name.lower() or "position" in name.lower())
        encoder = name.startswith("model.encoder.") and not name.startswith("model.encoder.backbone.")
        groups.setdefault((decay, encoder), []).append(parameter)
    param_groups = [
        {
            "params": parameters,
            "weight_decay": args.weight_decay if decay else 0.0,
            "lr": args.learning_rate * (args.encoder_lr_scale if encoder else 1.0),
        }
        for (decay, encoder), parameters in groups.items()
    ]
    return torch.optim.AdamW(param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2))


def find_checkpoint(output_dir: str, resume_from_checkpoint: str) -> Path:
    """Resolves `--resume_from_checkpoint` ('latest' = the newest `step_N` folder in `output_dir`)."""
    if resume_from_checkpoint != "latest":
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"No checkpoint folder at {path}")
        return path
    candidates = [p for p in Path(output_dir).glob("step_*") if p.is_dir() and re.fullmatch(r"step_\d+", p.name)]
    if not candidates:
        raise FileNotFoundError(f"--resume_from_checkpoint latest: no step_N checkpoint in {output_dir}")
    return max(candidates, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int) -> None:
    path = Path(output_dir) / f"step_{step}"
    accelerator.save_state(str(path))
    if accelerator.is_main_process:
        (path / "training_state.json").write_text(json.dumps({"completed_steps": step}))


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
    """Draws the detections of the first validation images into `output_dir/detections/`."""
    folder = output_dir / "detections"
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    paths = []
    count = min(args.num_visualizations, len(dataset))
    for index in range(count):
        example = dataset[index]
        image = example["image"].convert("RGB")
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
    output_dir = Path(args.output_dir)
    # Accelerate only sets up gloo between CPU processes (torchrun, `accelerate launch --multi_gpu`) when told `cpu=True`.
    use_cpu = args.cpu or (not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    accelerator = Accelerator(
        cpu=use_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to if args.with_tracking else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # A sampler seeded per epoch gives the same data order after a resume.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
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
        splits = load_detection_splits(args)
    train_dataset, eval_dataset, id2label = splits.train, splits.validation, splits.id2label
    logger.info(f"Train: {len(train_dataset)} images; validation: {len(eval_dataset) if eval_dataset else 0}; {id2label}")

    model, processor = build_model_and_processor(args, id2label)
    logger.info(f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    canvas = processor.image_processor.size["longest_edge"]
    synthetic = not (args.dataset_name or args.coco_annotations)
    if args.augmentation is None:
        args.augmentation = "light" if synthetic else "finetune"
    if args.per_device_train_batch_size is None:
        # Small batches on the synthetic set: more updates in the minutes a CPU run has.
        args.per_device_train_batch_size = 8 if synthetic else 32
    if synthetic and args.max_train_minutes is None and args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_minutes = SYNTHETIC_MINUTES
    if args.num_train_epochs is None:
        args.num_train_epochs = SYNTHETIC_EPOCHS if synthetic else 50
    if args.lr_scheduler_type is None:
        # A short run is still early in learning: decaying the rate cost 6x in mAP (docs/training.md).
        args.lr_scheduler_type = "constant_with_warmup" if synthetic else "linear"
    if args.eval_steps is None and synthetic:
        args.eval_steps = 1000
    if args.learning_rate is None:
        args.learning_rate = FINETUNE_LEARNING_RATE if args.model_name_or_path else SCRATCH_LEARNING_RATE
    if args.encoder_lr_scale is None:
        # From scratch, at the full rate the encoder drowns the image in a growing image-independent component and the
        # decoder learns the sequence prior only (docs/training.md, "Why the encoder learns slower").
        args.encoder_lr_scale = 1.0 if args.model_name_or_path else 0.1
    train_collator = Pix2SeqCollator(
        processor,
        transforms=build_train_transforms(args.augmentation, canvas),
        training=True,
        num_augmentations=args.num_augmentations,
        seed=args.seed,
    )
    eval_collator = Pix2SeqCollator(processor, training=False)
    train_dataloader = DataLoader(
        train_dataset,
        batch_size=args.per_device_train_batch_size,
        shuffle=True,
        collate_fn=train_collator,
        num_workers=args.dataloader_num_workers,
    )
    eval_dataloader = None
    if eval_dataset is not None:
        eval_dataloader = DataLoader(
            eval_dataset, batch_size=args.per_device_eval_batch_size, collate_fn=eval_collator, num_workers=0
        )

    optimizer = build_optimizer(model, args)
    updates_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * updates_per_epoch
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.num_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, scheduler = accelerator.prepare(model, optimizer, train_dataloader, scheduler)
    if eval_dataloader is not None:
        eval_dataloader = accelerator.prepare(eval_dataloader)

    if args.with_tracking:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("pix2seq", tracked)

    completed_steps, starting_epoch, resume_batches = 0, 0, 0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        accelerator.load_state(str(checkpoint))
        completed_steps = json.loads((checkpoint / "training_state.json").read_text())["completed_steps"]
        starting_epoch = completed_steps // updates_per_epoch
        resume_batches = (completed_steps % updates_per_epoch) * args.gradient_accumulation_steps
        logger.info(f"Resumed from {checkpoint} at step {completed_steps} (epoch {starting_epoch}).")

    total_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"Training {args.max_train_steps} steps ({num_epochs} epochs) at {total_batch} images per step "
        f"(x{args.num_augmentations} augmentations), learning rate {args.learning_rate}"
        + (f", or {args.max_train_minutes} minutes, whichever ends first" if args.max_train_minutes else "")
    )
    progress = tqdm(
        range(args.max_train_steps), initial=completed_steps, disable=not accelerator.is_local_main_process
    )
    history, start_time, stop = [], time.time(), False
    eval_seconds = 0.0  # time spent in evaluations during training, left out of `train_minutes` in the history
    running_loss, running_count = 0.0, 0
    model.train()
    for epoch in range(starting_epoch, num_epochs):
        train_collator.set_epoch(epoch)
        train_dataloader.set_epoch(epoch)
        batches = train_dataloader
        if epoch == starting_epoch and resume_batches:
            batches = accelerator.skip_first_batches(train_dataloader, resume_batches)
        for batch in batches:
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
            if args.with_tracking:
                accelerator.log({"train/loss": loss, "train/lr": scheduler.get_last_lr()[0]}, step=completed_steps)
            if args.checkpointing_steps and args.checkpointing_steps.isdigit():
                if completed_steps % int(args.checkpointing_steps) == 0:
                    save_checkpoint(accelerator, args.output_dir, completed_steps)
            out_of_time = args.max_train_minutes and (time.time() - start_time) / 60 >= args.max_train_minutes
            last_step = completed_steps >= args.max_train_steps or out_of_time
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
            save_checkpoint(accelerator, args.output_dir, completed_steps)
        if stop:
            break
    progress.close()
    train_minutes = (time.time() - start_time) / 60

    results = {"train_steps": completed_steps, "train_minutes": round(train_minutes, 2), "world_size": accelerator.num_processes}
    if eval_dataloader is not None:
        metrics = run_evaluation(accelerator, model, processor, eval_dataloader, args)
        history.append(
            {
                "step": completed_steps,
                "loss": loss if completed_steps else None,
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
        unwrapped.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        if eval_dataset is not None and args.num_visualizations:
            results["visualizations"] = save_visualizations(unwrapped, processor, eval_dataset, args, output_dir)
        with open(output_dir / "all_results.json", "w") as handle:
            json.dump(results, handle, indent=2)
        logger.info(f"Saved the model, the processor and all_results.json in {output_dir}")
        if args.push_to_hub:
            repo_id = args.hub_model_id or output_dir.name
            unwrapped.push_to_hub(repo_id)
            processor.push_to_hub(repo_id)
    return 0


if __name__ == "__main__":
    sys.exit(main())
