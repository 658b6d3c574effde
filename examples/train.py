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
import dataclasses
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
from transformers import HfArgumentParser, get_scheduler

import pix2seq_hf  # noqa: F401  (registers the Auto classes)
from pix2seq_hf import hub, training_plan, training_recipes, training_setup
from pix2seq_hf.checkpointing import (
    check_output_dir,
    check_same_run,
    check_saved_objects,
    find_checkpoint,
    read_training_state,
    remove_checkpoints,
    save_checkpoint,
    write_files_atomically,
)
from pix2seq_hf.cli import HelpFormatter
from pix2seq_hf.data import (
    ImageReadError,
    Pix2SeqCollator,
    build_train_transforms,
    decode_image,
    load_detection_splits,
    objects_per_image,
    undecoded_images,
)
from pix2seq_hf.data.images import set_max_image_pixels, to_rgb
from pix2seq_hf.data.streaming import StreamingDataLoader, load_streaming_splits
from pix2seq_hf.evaluation import METRIC_KEYS, evaluate_model
from pix2seq_hf.interruption import StopOnSignal
from pix2seq_hf.run_lock import hold_output_dir
from pix2seq_hf.training_options import (
    SYNTHETIC_EVAL_STEPS,
    DataOptions,
    EvaluationOptions,
    ModelOptions,
    RecipeOptions,
    RunOptions,
)
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
    "sequences_per_image",
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
    "coordinate_embedding_init",
    "auxiliary_copy",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "encoder_lr_scale",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "ema_decay",
    "lr_scheduler_type",
    "lr_decay_fraction",
    "num_warmup_steps",
    "seed",
)

# The option groups of the script, in the order of `--help`.
OPTION_GROUPS = (DataOptions, ModelOptions, RecipeOptions, EvaluationOptions, RunOptions)


def parse_args(argv=None) -> argparse.Namespace:
    """
    The options of all groups (`pix2seq_hf.training_options`) as one namespace. A `--recipe`'s values become the
    defaults, so that options given on the command line win. A value an option refuses ends the script with an error
    naming the option.
    """
    parser = HfArgumentParser(OPTION_GROUPS, description=__doc__, formatter_class=HelpFormatter)
    known, _ = parser.parse_known_args(argv)
    if known.recipe is not None:
        parser.set_defaults(
            **training_recipes.recipe_defaults(
                known.recipe, None, known.gradient_accumulation_steps, known.per_device_train_batch_size
            )
        )
    try:
        groups = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    args = argparse.Namespace(**{name: value for group in groups for name, value in vars(group).items()})
    if args.streaming and args.max_train_steps is None and args.max_train_minutes is None:
        parser.error("streaming needs max_train_steps or max_train_minutes: a stream has no length to count epochs in.")
    return args


def options(options_class: type, args: argparse.Namespace):
    """The group `options_class` (e.g. `DataOptions`) of the parsed options `args`, as they are now."""
    return options_class(**{f.name: getattr(args, f.name) for f in dataclasses.fields(options_class)})


def build_train_collator(args, processor) -> Pix2SeqCollator:
    """The training collator of `args`: the data's augmentation (`--augmentation` or its default) at the processor's
    canvas, `--num_augmentations` copies and `--sequences_per_image` sequences per image, seeded by `--seed`."""
    canvas = processor.image_processor.size["longest_edge"]
    return Pix2SeqCollator(
        processor,
        transforms=build_train_transforms(options(DataOptions, args).training_augmentation, canvas),
        training=True,
        num_augmentations=args.num_augmentations,
        sequences_per_image=args.sequences_per_image,
        seed=args.seed,
        on_bad_image=args.on_bad_image,
    )


def build_model_and_processor(args, id2label: dict[int, str], objects_per_image=None):
    """The model (a preset or a saved model) and a processor whose token layout matches it; `objects_per_image`
    (the training images' object counts) sizes a new model's sequences when `--max_objects` is not given."""
    return training_setup.build_model_and_processor(id2label, options(ModelOptions, args), objects_per_image)


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
    Resolves the recipe of the run (`RecipeOptions.resolved`: learning rates, and the synthetic set's budget) and
    plans it (`RecipeOptions.plan`: batch size, steps, warm-up), writing the values into `args`.
    """
    recipe = options(RecipeOptions, args).resolved(synthetic, fine_tuning=bool(args.model_name_or_path))
    plan = recipe.plan(num_images, num_processes, synthetic)
    given_warmup, steps = args.num_warmup_steps, plan.max_train_steps
    if given_warmup is not None and steps and given_warmup > 0.1 * steps:
        logger.warning(
            f"--num_warmup_steps {given_warmup} is more than 10% of the {steps} planned steps: "
            "the learning rate stays low for much of the run."
        )
    vars(args).update(vars(recipe))
    args.per_device_train_batch_size, args.max_train_steps = plan.per_device_batch_size, plan.max_train_steps
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
    if args.lr_scheduler_type == "linear":
        budget = training_setup.LinearDecayToBudget.for_plan(plan, num_processes)
        return torch.optim.lr_scheduler.LambdaLR(optimizer, budget), budget
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=plan.warmup_steps * num_processes,
        num_training_steps=plan.max_train_steps * num_processes,
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
    """COCO metrics (`METRIC_KEYS`) of `model` (unwrapped) on the validation batches; leaves it in training mode."""
    generation_kwargs = options(EvaluationOptions, args).generation_kwargs()
    model.eval()
    metrics = evaluate_model(
        model,
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
            splits = load_detection_splits(options(DataOptions, args), seed=args.seed)
            train_dataset, eval_dataset, id2label = splits.train, splits.validation, splits.id2label
    num_train_images = train_dataset.num_examples if args.streaming else len(train_dataset)
    if num_train_images is None:
        raise ValueError(
            f"The stream of {args.dataset_name!r} ({args.train_split}) does not say how many examples it has (its "
            "dataset info has no split sizes), which the run's plan needs; train without --streaming."
        )
    logger.info(f"Train: {num_train_images} images; validation: {len(eval_dataset) if eval_dataset else 0}; {id2label}")

    model, processor = build_model_and_processor(
        args, id2label, None if args.streaming else objects_per_image(train_dataset)
    )
    logger.info(f"Model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    data = options(DataOptions, args)
    args.augmentation = data.training_augmentation
    plan = plan_run(args, num_train_images, accelerator.num_processes, data.synthetic)
    if args.eval_steps is None and data.synthetic:
        args.eval_steps = SYNTHETIC_EVAL_STEPS
    train_collator = build_train_collator(args, processor)
    eval_collator = Pix2SeqCollator(processor, training=False, on_bad_image=args.on_bad_image)
    # The collators decode the images themselves, so that a bad one met mid-run is named (file, image id) or skipped.
    checkpointed_objects = []  # what each object registered for checkpointing is, in order
    if args.streaming:
        train_dataloader = StreamingDataLoader(
            train_dataset, args.per_device_train_batch_size, train_collator, args.dataloader_num_workers,
            accelerator.device,
        )  # fmt: skip
        accelerator.register_for_checkpointing(train_dataloader)
        checkpointed_objects.append("the stream's position (--streaming)")
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
    weight_average = None
    if args.ema_decay is not None:
        weight_average = training_setup.build_weight_average(model, args.ema_decay).to(accelerator.device)
        accelerator.register_for_checkpointing(weight_average)
        checkpointed_objects.append("the weight average (--ema_decay)")
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

    def trained_model() -> torch.nn.Module:
        """The model to evaluate, save and upload: the weight average with --ema_decay, else the model trained."""
        return weight_average.module if weight_average is not None else accelerator.unwrap_model(model)

    if args.with_tracking:
        tracked = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("pix2seq", tracked)

    run = run_arguments(args, accelerator)
    completed_steps, starting_epoch, resume_batches, resumed_seconds = 0, 0, 0, 0.0
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(args.output_dir, args.resume_from_checkpoint)
        state = read_training_state(checkpoint)
        check_same_run(checkpoint, state, run)
        check_saved_objects(checkpoint, checkpointed_objects)
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
        f"{plan.describe()} Training at learning rate {args.learning_rate}, x{args.num_augmentations} augmentations, "
        f"{args.sequences_per_image} sequence(s) per image"
        + (f", evaluating and saving the weights' moving average (decay {args.ema_decay})." if weight_average else ".")
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
            if weight_average is not None:
                weight_average.update_parameters(accelerator.unwrap_model(model))
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
                            trained_model(), processor, args,
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
                metrics = run_evaluation(accelerator, trained_model(), processor, eval_dataloader, args)
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
        metrics = run_evaluation(accelerator, trained_model(), processor, eval_dataloader, args)
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
        unwrapped = trained_model()
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
