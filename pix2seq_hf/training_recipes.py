"""
Named training recipes: the option values of the paper's runs (Objects365 pretraining, COCO fine-tuning) for
`examples/train.py --recipe NAME`. A recipe sets defaults; an option given on the command line wins.

Batch sizes are global (all processes and accumulation steps together, as the paper states them): the per-process
batch is the global batch divided by the number of processes and by `--gradient_accumulation_steps`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field


# COCO train2017's images: the fine-tuning recipe's warm-up is two of its epochs.
COCO_TRAIN2017_IMAGES = 118_287


@dataclass(frozen=True)
class TrainingRecipe:
    """
    One named recipe.

    Attributes:
        name (`str`): what `--recipe` takes.
        global_batch_size (`int`): images per optimizer update, over all processes.
        options (`dict`): `examples/train.py` option (its `dest`) -> value.
        source (`str`): where the values come from.
    """

    name: str
    global_batch_size: int
    options: dict = field(default_factory=dict)
    source: str = ""


# The paper's fine-tuning batch for ResNet backbones (64 for ViT backbones: pass --per_device_train_batch_size).
_FINETUNE_BATCH = 128

RECIPES: dict[str, TrainingRecipe] = {
    recipe.name: recipe
    for recipe in (
        TrainingRecipe(
            "pix2seq-o365-pretrain",
            global_batch_size=256,
            options={
                "config_preset": "r50",
                "image_size": 640,
                "augmentation": "pretrain",
                "max_train_steps": 400_000,
                "learning_rate": 1e-3,
                "weight_decay": 0.05,
                "adam_beta1": 0.9,
                "adam_beta2": 0.95,
                "lr_scheduler_type": "cosine",
                "num_warmup_steps": 20_000,
            },
            source="the paper, appendix A (Objects365 pretraining: 640 x 640, batch 256, 400k steps, learning rate "
            "1e-3, weight decay 0.05, cosine decay after 20k warm-up steps, scale jitter [0.9, 1.2] for ResNet "
            "backbones, no colour distortion); AdamW betas of the official configs",
        ),
        TrainingRecipe(
            "pix2seq-coco-finetune",
            global_batch_size=_FINETUNE_BATCH,
            options={
                "image_size": 640,
                "augmentation": "finetune",
                "num_train_epochs": 60,
                "learning_rate": 3e-5,
                "weight_decay": 0.05,
                "adam_beta1": 0.9,
                "adam_beta2": 0.95,
                "lr_scheduler_type": "linear",
                "lr_decay_fraction": 1.0,
                "num_warmup_steps": 2 * math.ceil(COCO_TRAIN2017_IMAGES / _FINETUNE_BATCH),
            },
            source="the paper, appendix A (COCO fine-tuning: batch 128 for ResNet backbones, 60 epochs, learning rate "
            "3e-5, scale jitter [0.3, 2]); weight decay, AdamW betas and the 2-epoch warm-up of the official "
            "configs/config_det_finetune.py",
        ),
    )
}


def world_size() -> int:
    """The number of processes of the run, from the launcher's `WORLD_SIZE` (1 without a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def recipe_defaults(
    name: str,
    num_processes: int | None = None,
    gradient_accumulation_steps: int | None = None,
    per_device_train_batch_size: int | None = None,
) -> dict:
    """
    The option defaults of a recipe, with the per-process batch worked out from its global batch.

    Args:
        name (`str`): a key of `RECIPES`.
        num_processes (`int`, *optional*): processes of the run (defaults to `world_size()`).
        gradient_accumulation_steps (`int`, *optional*): defaults to 1.
        per_device_train_batch_size (`int`, *optional*): a batch given explicitly, kept as it is.

    Returns:
        `dict` of option -> value, `per_device_train_batch_size` included.

    Raises:
        `ValueError` for an unknown recipe, or a global batch that the processes and accumulation steps do not divide.
    """
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe {name!r}; choose one of {sorted(RECIPES)}.")
    recipe = RECIPES[name]
    if per_device_train_batch_size is not None:
        return {**recipe.options, "per_device_train_batch_size": per_device_train_batch_size}
    num_processes = num_processes or world_size()
    accumulation = gradient_accumulation_steps or 1
    per_device, remainder = divmod(recipe.global_batch_size, num_processes * accumulation)
    if remainder or not per_device:
        raise ValueError(
            f"Recipe {name!r} trains with a global batch of {recipe.global_batch_size} images, which "
            f"{num_processes} processes x {accumulation} accumulation steps do not divide; give "
            "per_device_train_batch_size (and scale learning_rate with the global batch) or change "
            "gradient_accumulation_steps."
        )
    return {**recipe.options, "per_device_train_batch_size": per_device}
