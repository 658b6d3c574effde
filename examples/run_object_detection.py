"""
Fine-tune (or train) Pix2Seq with the transformers `Trainer`, in the style of transformers'
`examples/pytorch/object-detection/run_object_detection.py`: `TrainingArguments` for everything about the run
(evaluation and save strategies, `report_to`, `push_to_hub` / `hub_strategy`, `load_best_model_at_end`), COCO mAP at
every evaluation through the model's own decoding, early stopping, resuming from the last checkpoint.

The data, model and evaluation options are those of `examples/train.py` (`pix2seq_hf.training_options`), and so is
the recipe: with no optimisation option it trains as `examples/train.py` does (learning rate 2e-3 from scratch or 3e-5
fine-tuning, encoder learning-rate factor 0.1 from scratch, AdamW weight decay 0.05 and betas (0.9, 0.95), gradient
clipping at 1, a warm-up of 5% of the planned steps, the full rate until 80% of the budget and linear decay to 0 after
it (`--lr_decay_fraction` 0.2; 1 when fine-tuning: decay over the whole run), the batch size planned from the data,
and on the synthetic set 10 epochs or 13.5 minutes, whichever ends first), not with the `Trainer`'s own defaults
(5e-5, 3 epochs, no weight decay, beta2 0.999, no warm-up). It trains (`--do_train`) and evaluates (`--do_eval`)
unless told otherwise. With no data option it trains on the built-in synthetic shapes set:

    python examples/run_object_detection.py --output_dir outputs/pix2seq-trainer \\
        --eval_strategy steps --eval_steps 500 --save_strategy steps --save_steps 500 --load_best_model_at_end

    # CPPE-5 from the Hub, the paper's R50 with ImageNet weights, pushed to the Hub with every save
    python examples/run_object_detection.py --dataset_name cppe-5 --config_preset r50 --pretrained_backbone \\
        --output_dir pix2seq-r50-cppe5 --eval_strategy epoch --save_strategy epoch --load_best_model_at_end \\
        --push_to_hub --hub_strategy checkpoint

Evaluation decodes greedily (or samples with `--eval_top_p`), as in `examples/train.py`, and scores every decoded
object with pycocotools, one batch at a time (`batch_eval_metrics`: memory does not grow with the evaluation set).
`metric_for_best_model` defaults to `map`.
"""

import contextlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
import transformers
from transformers import EarlyStoppingCallback, HfArgumentParser, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import pix2seq_hf  # noqa: F401  (registers the Auto classes)
from pix2seq_hf import Pix2SeqProcessor, training_plan, training_recipes, training_setup
from pix2seq_hf.cli import HelpFormatter
from pix2seq_hf.data import Pix2SeqCollator, build_train_transforms, load_detection_splits, objects_per_image
from pix2seq_hf.data.images import set_max_image_pixels
from pix2seq_hf.evaluation import KEEP_ALL_THRESHOLD, METRIC_KEYS, CocoDetectionEvaluator
from pix2seq_hf.hub import remote_code, write_model_card
from pix2seq_hf.interruption import StopOnSignal
from pix2seq_hf.run_lock import hold_output_dir
from pix2seq_hf.training_options import (
    TRAINING_ARGUMENTS_NAMES,
    DataOptions,
    EvaluationOptions,
    ModelOptions,
    Pix2SeqTrainingArguments,
    RecipeOptions,
    option,
)


logger = logging.getLogger(__name__)

# Rows of the padded tensors that carry detections and ground truth between `prediction_step` and the metric.
PAD = -100.0


@dataclass
class TrainerOptions:
    """What only this script has: early stopping and the model card's license."""

    _argument_group_name = "trainer"

    early_stopping_patience: int | None = option(
        help="Stop after this many evaluations without a better metric_for_best_model (default: no early stopping)."
    )
    license: str = option("apache-2.0", help="License of the model card.")


def pack_rows(rows: list[torch.Tensor], width: int) -> torch.Tensor:
    """`[B, max_n, width]`: the `[n_i, width]` tensors of a batch, padded with `PAD` rows (at least one row)."""
    longest = max([1] + [len(r) for r in rows])
    packed = torch.full((len(rows), longest, width), PAD)
    for index, r in enumerate(rows):
        packed[index, : len(r)] = r
    return packed


class CocoMetric:
    """
    `compute_metrics` for `batch_eval_metrics=True`: adds each batch's ground truth and detections to a
    `CocoDetectionEvaluator` (from the rows `Pix2SeqTrainer.prediction_step` packs) and returns the COCO metrics at the
    last batch, then starts afresh. An image met twice (the padding of a distributed sampler) counts once.
    """

    def __init__(self, id2label: dict[int, str]):
        self.id2label = id2label
        self.evaluator = CocoDetectionEvaluator(id2label)

    def __call__(self, eval_prediction, compute_result: bool) -> dict[str, float] | None:
        detections = torch.as_tensor(eval_prediction.predictions).cpu()
        truths = torch.as_tensor(eval_prediction.label_ids).cpu()
        for found, truth in zip(detections, truths):
            image_id, height, width = (int(v) for v in truth[0, :3])
            if image_id in self.evaluator.images:
                continue
            objects = truth[1:][truth[1:, 4] != PAD]
            self.evaluator.add_ground_truth(
                image_id,
                height,
                width,
                objects[:, :4],
                objects[:, 4].long(),
                iscrowd=objects[:, 5].long(),
                areas=objects[:, 6],
            )
            found = found[found[:, 5] != PAD]
            self.evaluator.add_predictions(image_id, found[:, :4], found[:, 5].long(), found[:, 4])
        if not compute_result:
            return None
        metrics = self.evaluator.compute()
        self.evaluator = CocoDetectionEvaluator(self.id2label)
        return {key: float(metrics[key]) for key in METRIC_KEYS}


class Pix2SeqTrainer(Trainer):
    """
    A `Trainer` whose evaluation decodes: `prediction_step` computes the teacher-forced loss, then generates and
    post-processes the detections of the batch (every decoded object kept), returning them with the ground truth as
    padded tensors for `CocoMetric`.

    The Trainer's `processing_class` is the image processor, as in transformers' object-detection example: the
    Trainer aligns the special tokens of a `ProcessorMixin`'s tokenizer with the model before training, and Pix2Seq's
    processor has no tokenizer (its token layout is checked against the model by `check_model_compatible`). The
    whole processor (`processor`: box codec and token layout besides the image processor) is saved with every model
    the Trainer saves or pushes.
    """

    def __init__(
        self,
        *args,
        processor: Pix2SeqProcessor,
        eval_data_collator=None,
        generation_kwargs: dict | None = None,
        encoder_lr_scale: float = 1.0,
        plan: training_plan.TrainingPlan | None = None,
        time_budget: "TimeBudget | None" = None,
        card_info: dict | None = None,
        **kwargs,
    ):
        super().__init__(*args, processing_class=processor.image_processor, **kwargs)
        self.processor = processor
        self.eval_data_collator = eval_data_collator
        self.generation_kwargs = dict(generation_kwargs or {"do_sample": False})
        self.encoder_lr_scale = encoder_lr_scale
        self.plan = plan
        self.time_budget = time_budget
        # What the model card says besides the metrics: dataset, dataset_description, base_model, license.
        self.card_info = dict(card_info or {})
        self.card_metrics: dict | None = None

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.processor.save_pretrained(output_dir if output_dir is not None else self.args.output_dir)

    def get_eval_dataloader(self, eval_dataset=None):
        """The evaluation loader, collated without augmentation and with the ground truth (`eval_data_collator`)."""
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator or self.data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = training_setup.optimizer_param_groups(
                self.model, self.args.learning_rate, self.args.weight_decay, self.encoder_lr_scale
            )
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        # `linear` is examples/train.py's schedule: the planned decay, to 0 at the steps or the minutes.
        if self.lr_scheduler is None and self.plan is not None and self.args.lr_scheduler_type == "linear":
            schedule = training_setup.LinearDecayToBudget.for_plan(self.plan)
            if self.time_budget is not None:
                self.time_budget.schedule = schedule
            self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, schedule)
            return self.lr_scheduler
        return super().create_scheduler(num_training_steps, optimizer)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(
            pixel_values=inputs["pixel_values"], decoder_input_ids=inputs["decoder_input_ids"], labels=inputs["labels"]
        )
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs).detach() if "labels" in inputs else None
            if prediction_loss_only:
                return loss, None, None
            unwrapped = self.accelerator.unwrap_model(model)
            generated = unwrapped.generate(
                inputs["pixel_values"], return_dict_in_generate=True, output_logits=True, **self.generation_kwargs
            )
        targets = inputs["targets"]
        sizes = [tuple(int(v) for v in target["orig_size"].reshape(-1)) for target in targets]
        found = self.processor.post_process_object_detection(
            generated, threshold=KEEP_ALL_THRESHOLD, target_sizes=sizes
        )
        detections = pack_rows(
            [torch.cat([f["boxes"], f["scores"][:, None], f["labels"][:, None].float()], dim=1).cpu() for f in found],
            6,
        )
        truths = []
        for target, (height, width) in zip(targets, sizes):
            boxes = target["boxes"].float().cpu()
            header = torch.tensor([[float(target["image_id"].reshape(-1)[0]), height, width, 0, PAD, 0, 0]])
            objects = torch.cat(
                [boxes, target["labels"][:, None].float().cpu(), target["iscrowd"][:, None].float().cpu(),
                 target["area"][:, None].float().cpu()],
                dim=1,
            )  # fmt: skip
            truths.append(torch.cat([header, objects]))
        device = inputs["pixel_values"].device
        return loss, detections.to(device), pack_rows(truths, 7).to(device)

    def create_model_card(self, **kwargs):
        """A Pix2Seq model card (metrics, data, training arguments, usage) in `output_dir`, not the generic one."""
        if not self.is_world_process_zero():
            return
        write_model_card(
            self.args.output_dir,
            model=self.model,
            metrics=self.card_metrics,
            training_arguments=self.args.to_sanitized_dict(),
            repo_id=self.hub_model_id or self.args.hub_model_id,
            **self.card_info,
        )

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # The Trainer copies only weights and configs from the checkpoint; the remote code goes along with them.
        for source in Path(checkpoint_folder).glob("*.py"):
            shutil.copy(source, Path(self.args.output_dir) / source.name)
        if not (Path(self.args.output_dir) / "README.md").is_file():
            self.create_model_card()
        self.processor.save_pretrained(self.args.output_dir)
        super()._push_from_checkpoint(checkpoint_folder)


class SetEpochCallback(TrainerCallback):
    """Tells the training collator the epoch, which (with the seed) fixes every image's augmentation."""

    def __init__(self, collator: Pix2SeqCollator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(int(state.epoch or 0))


class TimeBudget(TrainerCallback):
    """
    `--max_train_minutes` under the `Trainer`, as in `examples/train.py`: tells the `linear` schedule the time spent
    (`Pix2SeqTrainer.create_scheduler`), and ends training after the step in which the minutes ran out.
    """

    def __init__(self, plan: training_plan.TrainingPlan):
        self.plan = plan
        self.schedule: training_setup.LinearDecayToBudget | None = None
        self.start = time.time()

    def on_train_begin(self, args, state, control, **kwargs):
        # A resumed run's scheduler state holds the minutes spent before the resume: the clock goes on from there.
        self.start = time.time() - (self.schedule.elapsed_seconds if self.schedule is not None else 0.0)

    def on_step_begin(self, args, state, control, **kwargs):
        if self.schedule is not None:
            self.schedule.set_elapsed(time.time() - self.start)

    def on_step_end(self, args, state, control, **kwargs):
        if (time.time() - self.start) / 60 >= self.plan.max_train_minutes:
            control.should_training_stop = True


def plan_training(
    training_args: Pix2SeqTrainingArguments, recipe: RecipeOptions, num_images: int, synthetic: bool
) -> training_plan.TrainingPlan:
    """
    Plans the training as `examples/train.py` does (`RecipeOptions.plan` of the resolved `recipe`) and writes the
    plan into `training_args`: learning rate, batch size, steps and warm-up.

    Returns:
        `TrainingPlan`.
    """
    plan = recipe.plan(num_images, training_args.world_size, synthetic)
    logger.info(plan.describe())
    training_args.learning_rate = recipe.learning_rate
    training_args.per_device_train_batch_size = plan.per_device_batch_size
    # The steps decide (the `Trainer` derives the epochs from them); only minutes: as many steps as they allow.
    training_args.max_steps = plan.max_train_steps or sys.maxsize
    training_args.num_train_epochs = plan.num_epochs or sys.maxsize
    training_args.warmup_steps = plan.warmup_steps
    return plan


class StopOnSignalCallback(TrainerCallback):
    """Ends training after the step in which Ctrl-C (SIGINT) or SIGTERM came, with a checkpoint of that step."""

    def __init__(self, interrupt: StopOnSignal, accelerator=None):
        self.interrupt = interrupt
        self.accelerator = accelerator

    def on_step_end(self, args, state, control, **kwargs):
        if self.interrupt.should_stop(self.accelerator):
            control.should_save = True
            control.should_training_stop = True


# The option groups of the script, in the order of `--help`.
OPTION_GROUPS = (DataOptions, ModelOptions, EvaluationOptions, TrainerOptions, Pix2SeqTrainingArguments)


def parse_args(
    argv=None,
) -> tuple[DataOptions, ModelOptions, EvaluationOptions, TrainerOptions, Pix2SeqTrainingArguments]:
    """
    The options of the run, one dataclass per group (`OPTION_GROUPS`), from the command line or from the JSON file
    given as the only argument. A `--recipe`'s values become the defaults, so that options given explicitly win.
    """
    parser = HfArgumentParser(OPTION_GROUPS, description=__doc__, formatter_class=HelpFormatter)
    if argv is None and len(sys.argv) == 2 and sys.argv[1].endswith(".json"):
        try:
            groups = parser.parse_json_file(json_file=os.path.abspath(sys.argv[1]))
        except ValueError as error:
            parser.error(f"{sys.argv[1]}: {error}")
        if groups[-1].recipe is not None:
            parser.error(f"{sys.argv[1]}: recipe is read from the command line only; give its values in the file.")
        if groups[0].streaming:
            parser.error("streaming is examples/train.py's: the Trainer here reads a dataset of known length.")
        return groups
    known, _ = parser.parse_known_args(argv)
    if known.recipe is not None:
        defaults = training_recipes.recipe_defaults(
            known.recipe, None, known.gradient_accumulation_steps, known.per_device_train_batch_size
        )
        names = {name: trainer_name for trainer_name, name in TRAINING_ARGUMENTS_NAMES.items()}
        parser.set_defaults(**{names.get(name, name): value for name, value in defaults.items()})
    try:
        groups = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:
        parser.error(str(error))
    if groups[0].streaming:
        parser.error("streaming is examples/train.py's: the Trainer here reads a dataset of known length.")
    return groups


def main(argv=None) -> int:
    data_args, model_args, eval_args, trainer_args, training_args = parse_args(argv)
    # One run per output folder (a second one is refused, naming this one); Ctrl-C / SIGTERM stop after a checkpoint.
    with hold_output_dir(training_args.output_dir), StopOnSignal() as interrupt:
        return run(data_args, model_args, eval_args, trainer_args, training_args, interrupt)


def run(
    data_args: DataOptions,
    model_args: ModelOptions,
    eval_args: EvaluationOptions,
    trainer_args: TrainerOptions,
    training_args: Pix2SeqTrainingArguments,
    interrupt: StopOnSignal,
) -> int:
    """Trains and/or evaluates as the arguments say; returns the exit status (`interrupt.exit_code` when stopped)."""
    # The collator reads the image and objects columns, which are not arguments of `forward`.
    training_args.remove_unused_columns = False
    # Detections are scored one batch at a time: evaluation memory does not grow with the evaluation set.
    training_args.batch_eval_metrics = True
    if training_args.load_best_model_at_end and training_args.metric_for_best_model in (None, "loss"):
        training_args.metric_for_best_model = "map"
        training_args.greater_is_better = True
    if data_args.max_image_pixels is not None:
        set_max_image_pixels(data_args.max_image_pixels)

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_level = training_args.get_process_log_level()
    logger.setLevel(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    transformers.utils.logging.set_verbosity(log_level)
    logger.warning(
        f"Process rank: {training_args.local_process_index}, device: {training_args.device}, "
        f"n_gpu: {training_args.n_gpu}, distributed: {training_args.parallel_mode.value}"
    )

    checkpoint = None
    if training_args.resume_from_checkpoint is not None:
        checkpoint = training_args.resume_from_checkpoint
    elif os.path.isdir(training_args.output_dir) and training_args.do_train:
        checkpoint = get_last_checkpoint(training_args.output_dir)
        if checkpoint is not None:
            logger.warning(f"Resuming from {checkpoint}; pass another --output_dir to train from scratch.")

    with training_args.main_process_first(desc="loading the data"):
        splits = load_detection_splits(data_args, seed=training_args.seed)
    model, processor = training_setup.build_model_and_processor(
        splits.id2label, model_args, objects_per_image(splits.train) if splits.train is not None else None
    )
    recipe = training_args.recipe_options().resolved(data_args.synthetic, bool(model_args.model_name_or_path))
    plan = time_budget = None
    if training_args.do_train:
        plan = plan_training(training_args, recipe, len(splits.train), data_args.synthetic)
        # `--max_train_minutes` (or the synthetic set's default minutes) ends the run and bounds the decay.
        time_budget = TimeBudget(plan) if plan.max_train_minutes is not None else None
    else:  # nothing is trained: the `Trainer`'s values for "no budget" (it still multiplies the batch size)
        training_args.max_steps, training_args.num_train_epochs = -1, 0
        training_args.per_device_train_batch_size = training_args.per_device_train_batch_size or 1
    train_collator = Pix2SeqCollator(
        processor,
        transforms=build_train_transforms(
            data_args.training_augmentation, processor.image_processor.size["longest_edge"]
        ),
        training=True,
        num_augmentations=data_args.num_augmentations,
        sequences_per_image=data_args.sequences_per_image,
        seed=training_args.seed,
        on_bad_image=data_args.on_bad_image,
    )
    eval_collator = Pix2SeqCollator(processor, training=False, on_bad_image=data_args.on_bad_image)

    callbacks = [SetEpochCallback(train_collator)]
    if time_budget is not None:
        callbacks.append(time_budget)
    if trainer_args.early_stopping_patience:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=trainer_args.early_stopping_patience))
    card_info = {
        "dataset": data_args.dataset_name
        if data_args.dataset_name and not os.path.exists(data_args.dataset_name)
        else None,
        "dataset_description": splits.source,
        "base_model": model_args.model_name_or_path,
        "license": trainer_args.license,
    }
    trainer = Pix2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=splits.train if training_args.do_train else None,
        eval_dataset=splits.validation,
        processor=processor,
        data_collator=train_collator,
        eval_data_collator=eval_collator,
        compute_metrics=CocoMetric(splits.id2label),
        callbacks=callbacks,
        generation_kwargs=eval_args.generation_kwargs(),
        encoder_lr_scale=recipe.encoder_lr_scale,
        plan=plan,
        time_budget=time_budget,
        card_info=card_info,
    )
    trainer.add_callback(StopOnSignalCallback(interrupt, trainer.accelerator))
    # Pushing: every save (checkpoints, the final model) carries the code, so that the pushed copies load with
    # `trust_remote_code=True` where pix2seq_hf is not installed.
    with remote_code() if training_args.push_to_hub else contextlib.nullcontext():
        if training_args.do_train:
            result = trainer.train(resume_from_checkpoint=checkpoint)
            if interrupt.received is not None:
                logger.warning(
                    f"Interrupted: stopped after step {trainer.state.global_step}, saved in "
                    f"{training_args.output_dir}/checkpoint-{trainer.state.global_step}. To go on, run the same "
                    "command again (it resumes from the last checkpoint of --output_dir)."
                )
                return interrupt.exit_code
            trainer.save_model()
            trainer.log_metrics("train", result.metrics)
            trainer.save_metrics("train", result.metrics)
            trainer.save_state()
        if training_args.do_eval and splits.validation is not None:
            metrics = trainer.evaluate()
            trainer.log_metrics("eval", metrics)
            trainer.save_metrics("eval", metrics)
            trainer.card_metrics = metrics
        if training_args.push_to_hub:
            trainer.push_to_hub()
        elif training_args.should_save:
            trainer.create_model_card()
    return 0


if __name__ == "__main__":
    sys.exit(main())
