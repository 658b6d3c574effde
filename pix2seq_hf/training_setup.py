"""
What the training scripts (`examples/train.py` with Accelerate, `examples/run_object_detection.py` with the `Trainer`)
build the same way: the model and processor of a run, and the optimizer's parameter groups.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from .configuration_pix2seq import TOKENS_PER_OBJECT, Pix2SeqConfig
from .image_processing_pix2seq import Pix2SeqImageProcessor
from .modeling_pix2seq import Pix2SeqForObjectDetection
from .presets import get_preset_config, get_preset_image_processor_kwargs, preset_config_fields
from .processing_pix2seq import Pix2SeqProcessor
from .training_options import ModelOptions
from .training_plan import plan_max_objects


logger = logging.getLogger(__name__)

# Training-sequence, loss and initialisation options of a model trained from scratch, where none is given. Only what
# measurably helps is on (docs/training.md).
SCRATCH_RECIPE = {
    "object_order": "dist2ori",
    "coordinate_label_sigma": 1.0,
    "auxiliary_loss_weight": 1.0,
    "coordinate_embedding_init": "sincos",
    "auxiliary_copy": True,  # with the auxiliary head only
}
# The config fields among them: a saved model keeps its own.
TRAINING_CONFIG_OPTIONS = (
    "coordinate_label_sigma", "auxiliary_loss_weight", "coordinate_embedding_init", "auxiliary_copy"
)


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
    encoder = model.model.encoder
    if encoder.auxiliary_head is not None:
        encoder.auxiliary_head = type(encoder.auxiliary_head)(config)
        encoder.auxiliary_head.apply(model._init_weights)
    model._box_codec = None
    tokens = ", ".join(f"{name} -> {config.class_token_offset + label}" for label, name in sorted(id2label.items()))
    logger.info(f"Fine-tuning onto a new label set (the model was trained on {old}); class tokens: {tokens}.")


def build_model_and_processor(
    id2label: dict[int, str],
    options: ModelOptions | None = None,
    objects_per_image: Sequence[int] | None = None,
    **overrides,
) -> tuple[Pix2SeqForObjectDetection, Pix2SeqProcessor]:
    """
    The model of a training run and a processor whose token layout matches it.

    Args:
        id2label (`dict[int, str]`): the classes of the data (contiguous labels).
        options (`ModelOptions`, *optional*): the model to build (defaults: `ModelOptions()`, a new `tiny` model):
            - `model_name_or_path`: a saved Pix2Seq model to fine-tune (moved onto `id2label` when its classes differ,
              see `relabel_model`); otherwise a new model of `config_preset` (a name of `presets.PRESETS`), from
              ImageNet timm weights with `pretrained_backbone`, or from the local timm weights `backbone_checkpoint`
              (a `timm.create_model(...).state_dict()` saved with safetensors or `torch.save`, loaded through timm's
              `pretrained_cfg_overlay=dict(file=...)`);
            - `image_size` (the canvas), `max_objects`, `num_bins`: override the preset's or the saved processor's
              (vocabulary and positions grow to fit);
            - `object_order`, `no_sequence_augmentation`: the training sequences (default: the saved processor's, or
              `SCRATCH_RECIPE`'s from scratch);
            - `coordinate_label_sigma`, `auxiliary_loss_weight`, `coordinate_embedding_init`, `auxiliary_copy`:
              training options of the config (default: the saved model's, or `SCRATCH_RECIPE`'s from scratch, the
              copy only with an auxiliary head); a saved model refuses other values;
            - `config_overrides`: other config fields of a new model (e.g. `{"decoder_layers": 4}`), applied last;
              refused when fine-tuning (a saved model keeps its architecture).
        objects_per_image (`Sequence[int]`, *optional*): the object count of every training image
            (`data.objects_per_image`). A new model given no `max_objects` then gets sequences for the fullest image
            (`training_plan.plan_max_objects`); without it, the preset's.
        **overrides: fields of `options` by keyword, taking precedence.

    Returns:
        `(Pix2SeqForObjectDetection, Pix2SeqProcessor)`.
    """
    options = dataclasses.replace(options or ModelOptions(), **overrides)
    counts = None if objects_per_image is None else np.asarray(objects_per_image, dtype=np.int64)
    model_name_or_path, config_overrides = options.model_name_or_path, options.config_overrides
    backbone_checkpoint, config_preset = options.backbone_checkpoint, options.config_preset
    image_size, max_objects, num_bins = options.image_size, options.max_objects, options.num_bins
    object_order, sequence_augmentation = options.object_order, not options.no_sequence_augmentation
    config_options = {name: getattr(options, name) for name in TRAINING_CONFIG_OPTIONS}
    if model_name_or_path:
        if config_overrides:
            raise ValueError(
                f"config_overrides {config_overrides} apply to a new model only; a saved model keeps its architecture."
            )
        if backbone_checkpoint:
            raise ValueError(
                f"backbone_checkpoint {os.fspath(backbone_checkpoint)!r} starts a new model's backbone; the saved model "
                f"{model_name_or_path!r} has its own weights."
            )
        model = Pix2SeqForObjectDetection.from_pretrained(model_name_or_path)
        saved = Pix2SeqProcessor.from_pretrained(model_name_or_path)
        for name, value in config_options.items():
            if value is not None and value != getattr(model.config, name):
                raise ValueError(
                    f"{name} {value} differs from the saved model's {getattr(model.config, name)}; fine-tuning keeps "
                    "the saved model's training options."
                )
        if dict(model.config.id2label) != dict(id2label):
            relabel_model(model, id2label)
        image_processor = saved.image_processor
        if image_size:
            image_processor.size = {"longest_edge": image_size}
        codec_options = dict(saved.codec_options)
        if object_order:
            codec_options["object_order"] = object_order
        if not sequence_augmentation:
            codec_options["sequence_augmentation"] = False
        processor = Pix2SeqProcessor.from_config(model.config, image_processor=image_processor, **codec_options)
    else:
        overrides = {"id2label": id2label, "use_pretrained_backbone": options.pretrained_backbone}
        if not max_objects and counts is not None and "max_objects" not in (config_overrides or {}):
            preset_max_objects = preset_config_fields(config_preset).get("max_objects", Pix2SeqConfig.max_objects)
            most_objects = int(counts.max(initial=0))
            max_objects = plan_max_objects(most_objects, preset_max_objects)
            if max_objects != preset_max_objects:
                logger.info(
                    f"max_objects {max_objects} (the preset's {preset_max_objects} are fewer than the {most_objects} "
                    "objects of the fullest training image)"
                )
        if max_objects:
            overrides["max_objects"] = max_objects
            overrides["max_position_embeddings"] = max(
                Pix2SeqConfig.max_position_embeddings, TOKENS_PER_OBJECT * max_objects + 1
            )
        if num_bins:
            overrides["num_bins"] = num_bins
            overrides["vocab_size"] = max(Pix2SeqConfig.vocab_size, Pix2SeqConfig.coord_token_offset + num_bins)
        for name, value in config_options.items():
            overrides[name] = SCRATCH_RECIPE[name] if value is None else value
        if config_options["auxiliary_copy"] is None:
            # The recipe copies from the auxiliary head where there is one.
            overrides["auxiliary_copy"] = SCRATCH_RECIPE["auxiliary_copy"] and overrides["auxiliary_loss_weight"] > 0
        overrides.update(config_overrides or {})
        if backbone_checkpoint:
            overrides.update(_local_backbone_weights(backbone_checkpoint, config_preset, overrides))
        config = get_preset_config(config_preset, **overrides)
        try:
            model = Pix2SeqForObjectDetection(config)
        except RuntimeError as error:
            if not config.use_pretrained_backbone or "size mismatch" not in str(error):
                raise
            source = "ImageNet's checkpoint"
            if backbone_checkpoint:
                source = f"The backbone checkpoint {os.fspath(backbone_checkpoint)!r}"
            model_kwargs = dict(config.backbone_model_kwargs or {})
            model_kwargs.pop("pretrained_cfg_overlay", None)
            raise ValueError(
                f"{source} does not fit the backbone of preset {config_preset!r} (timm arguments {model_kwargs}); "
                "give the backbone it was saved from with --config_overrides (a full-width ResNet-18 in the `tiny` "
                f"preset: '{{\"backbone_model_kwargs\": null}}'). {error}"
            ) from error
        # The weights now live in the model: a saved config must not load the backbone again, nor name a local file.
        model.config.use_pretrained_backbone = False
        if backbone_checkpoint:
            model_kwargs = dict(model.config.backbone_model_kwargs)
            model_kwargs.pop("pretrained_cfg_overlay")
            model.config.backbone_model_kwargs = model_kwargs or None
        image_processor = Pix2SeqImageProcessor(**get_preset_image_processor_kwargs(config_preset, image_size))
        processor = Pix2SeqProcessor.from_config(
            model.config,
            image_processor=image_processor,
            object_order=object_order or SCRATCH_RECIPE["object_order"],
            sequence_augmentation=sequence_augmentation,
        )
    logger.info(
        f"Object order {processor.object_order}, sequence augmentation {processor.sequence_augmentation}, "
        + ", ".join(f"{name} {getattr(model.config, name)}" for name in TRAINING_CONFIG_OPTIONS)
    )
    processor.check_model_compatible(model)
    if counts is not None:
        crowded = int(np.count_nonzero(counts > processor.max_objects))
        if crowded:
            logger.warning(
                f"{crowded} training images hold more than max_objects {processor.max_objects} objects; their "
                f"training sequences keep {processor.max_objects} of them (a new model takes a larger --max_objects)."
            )
    return model, processor


def _local_backbone_weights(path: str | os.PathLike, config_preset: str, overrides: dict) -> dict:
    """
    The config fields that make a new model's timm backbone load its weights from the local file `path`: timm's
    `pretrained_cfg_overlay=dict(file=path)` added to the backbone's `timm.create_model` arguments (the preset's and
    `overrides`'), and `use_pretrained_backbone`.

    Raises:
        `FileNotFoundError` when `path` is not a file.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The backbone checkpoint {path!r} is not a file.")
    model_kwargs = preset_config_fields(config_preset, **overrides).get("backbone_model_kwargs")
    model_kwargs = {**(model_kwargs or {}), "pretrained_cfg_overlay": {"file": path}}
    return {"backbone_model_kwargs": model_kwargs, "use_pretrained_backbone": True}


def default_mixed_precision(on_cpu: bool) -> str:
    """
    The mixed precision of a run that chose none: `"bf16"` when training on a CPU with bf16 matrix units (Intel AMX),
    where bf16 autocast makes a training step of the `tiny` preset about 1.4x faster (docs/training.md); `"no"`
    elsewhere (without such units bf16 is emulated and slower; on a GPU the choice is Accelerate's).

    Args:
        on_cpu (`bool`): whether the run trains on the CPU.

    Returns:
        `str`: `"bf16"` or `"no"`.
    """
    if on_cpu and torch.cpu.get_capabilities().get("amx_bf16", False):
        return "bf16"
    return "no"


def speed_up_cpu_training(model: torch.nn.Module, mixed_precision: str) -> torch.nn.Module:
    """
    Layouts and kernels that make a training step on the CPU faster, the same computation up to rounding (measured on
    the `tiny` preset, docs/training.md): convolution weights in channels-last layout (oneDNN's fast path; the saved
    weights are the same), and under bf16 autocast eager attention (torch's fused CPU attention kernel is slower in
    bf16 at these sequence lengths, its backward pass most).

    Args:
        model (`torch.nn.Module`): the model to train, changed in place.
        mixed_precision (`str`): the run's autocast precision (`"no"`, `"fp16"` or `"bf16"`).

    Returns:
        `torch.nn.Module`: `model`.
    """
    model.to(memory_format=torch.channels_last)
    if mixed_precision == "bf16":
        model.set_attn_implementation("eager")
    return model


def build_weight_average(model: torch.nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """
    An exponential moving average of `model`'s parameters and buffers (torch's `AveragedModel`): a copy of `model`
    that `update_parameters(model)` moves by `1 - decay` towards the current weights (the first call copies them).

    Args:
        model (`torch.nn.Module`): the model being trained (not wrapped for distribution).
        decay (`float`): the share of the average kept at each update, in (0, 1).

    Returns:
        `AveragedModel`: its `.module` is a model like `model`, for evaluation and saving; its state (the average and
        the update count) goes into the run's checkpoints.
    """
    swa_utils = torch.optim.swa_utils
    return swa_utils.AveragedModel(model, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(decay), use_buffers=True)


def optimizer_param_groups(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, encoder_lr_scale: float = 1.0
) -> list[dict]:
    """
    Parameter groups for AdamW: weight decay on weight matrices and kernels only (not on biases, norms or position
    embeddings), `learning_rate` everywhere except the Transformer encoder (the parameters of `model.model.encoder`
    outside its backbone and its auxiliary head), which learns at `learning_rate * encoder_lr_scale`.

    Returns:
        `list[dict]` with `params`, `weight_decay` and `lr` per group (trainable parameters only).
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decay = not (parameter.ndim < 2 or "norm" in name.lower() or "position" in name.lower())
        encoder = name.startswith("model.encoder.") and not name.startswith(
            ("model.encoder.backbone.", "model.encoder.auxiliary_head.")
        )
        groups.setdefault((decay, encoder), []).append(parameter)
    return [
        {
            "params": parameters,
            "weight_decay": weight_decay if decay else 0.0,
            "lr": learning_rate * (encoder_lr_scale if encoder else 1.0),
        }
        for (decay, encoder), parameters in groups.items()
    ]


class LinearDecayToBudget:
    """
    Learning-rate multiplier for `torch.optim.lr_scheduler.LambdaLR`: linear warm-up from 0, then linear decay that
    reaches 0 when the first of two budgets is spent, `num_training_steps` or `budget_seconds` of wall time. A run
    stopped by a time limit thus still ends on a small learning rate, however many steps the machine managed. Without
    a time budget this is transformers' `linear` schedule.

    The warm-up ends at `num_warmup_steps` or, given `warmup_seconds`, once that much time has passed, whichever comes
    first: a time budget then bounds the warm-up to a fraction of the run whatever the machine's pace. After it the
    multiplier is the lower of the steps' share left after the warm-up, `(num_training_steps - step) /
    (num_training_steps - num_warmup_steps)`, and the time's share left of the whole budget, `1 - elapsed /
    budget_seconds` (so a warm-up ended by time ends a little below the full rate, at `1 - warmup_seconds /
    budget_seconds`), divided by `decay_fraction` and capped at 1: with `decay_fraction` 0.2 the rate stays full until
    80% of the budget and decays to 0 over the last 20% (a warm-up-stable-decay schedule).

    The training loop reports the time spent with `set_elapsed`. The elapsed time and the step at which the warm-up
    ended (`warmup_ended_at`) are part of the scheduler's `state_dict` (`LambdaLR` saves the attributes of callable
    objects), so a resumed run continues the same schedule.

    Args:
        num_warmup_steps (`int`): scheduler steps of linear warm-up from 0.
        num_training_steps (`int` or `None`): scheduler steps at which the rate reaches 0; `None`: only the time budget
            ends the decay.
        budget_seconds (`float`, *optional*): seconds at which the rate reaches 0; no time budget when `None`.
        warmup_seconds (`float`, *optional*): seconds after which the warm-up ends even before `num_warmup_steps`; less
            than `budget_seconds`.
        decay_fraction (`float`, *optional*, defaults to 1.0): the last share of the budget over which the rate
            decays, in (0, 1].
    """

    def __init__(
        self,
        num_warmup_steps: int,
        num_training_steps: int | None,
        budget_seconds: float | None = None,
        warmup_seconds: float | None = None,
        decay_fraction: float = 1.0,
    ):
        if not 0 < decay_fraction <= 1:
            raise ValueError(f"`decay_fraction` must be in (0, 1], got {decay_fraction}.")
        if budget_seconds is not None and budget_seconds <= 0:
            raise ValueError(f"`budget_seconds` must be positive, got {budget_seconds}.")
        if num_training_steps is None and budget_seconds is None:
            raise ValueError("Either `num_training_steps` or `budget_seconds` must be given: the decay needs an end.")
        if warmup_seconds is not None and not 0 < warmup_seconds < (budget_seconds or math.inf):
            raise ValueError(
                f"`warmup_seconds` must be positive and less than `budget_seconds` ({budget_seconds}), got "
                f"{warmup_seconds}."
            )
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.budget_seconds = budget_seconds
        self.warmup_seconds = warmup_seconds
        self.decay_fraction = decay_fraction
        self.elapsed_seconds = 0.0
        self.warmup_ended_at: int | None = None

    @classmethod
    def for_plan(cls, plan, steps_per_update: int = 1) -> LinearDecayToBudget:
        """
        The schedule of a planned run (`training_plan.TrainingPlan`): its warm-up and step budget, and its minutes.

        Args:
            plan (`TrainingPlan`): the run's plan.
            steps_per_update (`int`, *optional*, defaults to 1): scheduler steps per optimizer update (Accelerate
                steps a prepared scheduler once per process).
        """
        seconds = {"budget_seconds": plan.max_train_minutes, "warmup_seconds": plan.warmup_minutes}
        seconds = {name: None if value is None else value * 60 for name, value in seconds.items()}
        steps = None if plan.max_train_steps is None else plan.max_train_steps * steps_per_update
        return cls(plan.warmup_steps * steps_per_update, steps, **seconds, decay_fraction=plan.decay_fraction)

    def set_elapsed(self, seconds: float) -> None:
        """Records the wall time spent so far (the whole run, resumed parts included)."""
        self.elapsed_seconds = float(seconds)

    def warmup_progress(self, step: int) -> float:
        """How far the warm-up is at `step` and the recorded time, from 0 to 1 (ended)."""
        progress = step / self.num_warmup_steps if self.num_warmup_steps > 0 else 1.0
        if self.warmup_seconds is not None:
            progress = max(progress, self.elapsed_seconds / self.warmup_seconds)
        return min(1.0, progress)

    def __call__(self, step: int) -> float:
        warmup = self.warmup_progress(step)
        if warmup < 1.0:
            return warmup
        if self.warmup_ended_at is None:
            self.warmup_ended_at = step
        remaining = 1.0
        if self.num_training_steps is not None:
            remaining = (self.num_training_steps - step) / max(1, self.num_training_steps - self.num_warmup_steps)
        if self.budget_seconds is not None:
            remaining = min(remaining, 1.0 - self.elapsed_seconds / self.budget_seconds)
        return min(1.0, max(0.0, remaining / self.decay_fraction))


__all__ = [
    "LinearDecayToBudget",
    "SCRATCH_RECIPE",
    "TRAINING_CONFIG_OPTIONS",
    "build_model_and_processor",
    "build_weight_average",
    "default_mixed_precision",
    "optimizer_param_groups",
    "relabel_model",
    "speed_up_cpu_training",
]
