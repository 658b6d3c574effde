"""
The plan of a training run, made from the number of training images and the budget where the user set no value: the
batch size per device, the epochs and steps, the warm-up and where the learning rate decays to 0. `examples/train.py`
prints it at the start and records it in `all_results.json`; `examples/run_object_detection.py` takes its warm-up.

Why each default is what it is (docs/training.md, "How a run is planned"):

- The batch is `MAX_BATCH_SIZE` on a large set, and on a small one the largest power of two that still makes
  `MIN_STEPS_PER_EPOCH` steps an epoch: a batch that holds most of the set repeats the same images in every update,
  and smaller batches give more updates for the same compute, which a small set in a fixed budget needs most.
- Epochs are the budget's: `max_train_steps` or `num_epochs` when given; with only a time budget, as many as fit in
  the minutes; with no budget at all `DEFAULT_NUM_EPOCHS`, but never fewer than `MIN_PLANNED_STEPS` steps, so that a
  small set gets many short epochs instead of a few dozen steps.
- A new model's sequence holds the preset's `max_objects`, or, when a training image holds more objects, that many
  rounded up to a multiple of `MAX_OBJECTS_MULTIPLE` (at most `MAX_PLANNED_OBJECTS`, the official models' 100):
  without it the `tiny` preset's 10 would silently keep only 10 objects of a crowded image in its training sequence.
  The preset's value is never lowered (sequences shorter than the data's would cut objects off too).
- The warm-up is `WARMUP_FRACTION` of the planned steps (at most `MAX_WARMUP_STEPS`) and, with a time budget, also
  ends once that fraction of the minutes has passed, whichever comes first. A run ended by its steps thus warms up over
  at most 5% of them; a run ended by its minutes over 5% of its time, which stays within the first 10% of its steps
  unless the later steps run at less than half the pace of the first ones.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass


# Images per step and device on a large set.
MAX_BATCH_SIZE = 32
# A small set gets the largest power-of-two batch that leaves at least this many steps an epoch.
MIN_STEPS_PER_EPOCH = 4
# Epochs of a run given no budget at all (no steps, epochs or minutes), and the fewest steps such a run plans.
DEFAULT_NUM_EPOCHS = 50
MIN_PLANNED_STEPS = 2000
# The warm-up: this fraction of the planned steps and of the minutes, whichever ends first, and at most this many steps
# (long runs warm up over their first 100 steps).
WARMUP_FRACTION = 0.05
MAX_WARMUP_STEPS = 100
# A new model's sequences hold the most objects of a training image in multiples of this many, and at most this many.
MAX_OBJECTS_MULTIPLE = 8
MAX_PLANNED_OBJECTS = 100


@dataclass(frozen=True)
class TrainingPlan:
    """
    A planned run. Step counts are optimizer updates (one per `gradient_accumulation_steps` batches).

    Attributes:
        num_images (`int`): training images.
        per_device_batch_size (`int`): images per batch on each device.
        images_per_step (`int`): images per update, over all devices and accumulated batches.
        steps_per_epoch (`int`): updates per epoch.
        max_train_steps (`int` or `None`): the step budget; `None` when only the time budget ends the run.
        num_epochs (`int` or `None`): epochs the step budget spans; `None` when only the time budget ends the run.
        max_train_minutes (`float` or `None`): the time budget; `None` without one.
        warmup_steps (`int`): updates of linear warm-up from 0.
        warmup_minutes (`float` or `None`): minutes after which the warm-up ends even if `warmup_steps` are not done.
        lr_scheduler_type (`str`): the schedule after the warm-up.
        decay_fraction (`float`): with the `linear` schedule, the last share of the budget over which the rate decays
            to 0 (1: from the end of the warm-up on; 0.2: full rate until 80% of the budget).
    """

    num_images: int
    per_device_batch_size: int
    images_per_step: int
    steps_per_epoch: int
    max_train_steps: int | None
    num_epochs: int | None
    max_train_minutes: float | None
    warmup_steps: int
    warmup_minutes: float | None
    lr_scheduler_type: str = "linear"
    decay_fraction: float = 1.0

    def describe(self) -> str:
        """The plan in one paragraph, as `examples/train.py` prints it at the start."""
        if self.max_train_steps is None:
            length = f"until {self.max_train_minutes:g} minutes have passed"
        else:
            length = f"{self.max_train_steps} steps ({self.num_epochs} epochs)"
            if self.max_train_minutes is not None:
                length += f" or {self.max_train_minutes:g} minutes, whichever ends first"
        warmup = f"{self.warmup_steps} steps"
        if self.warmup_minutes is not None:
            warmup += f" or {self.warmup_minutes:.3g} minutes, whichever ends first"
        if self.lr_scheduler_type != "linear":
            decay = f"then the `{self.lr_scheduler_type}` schedule over the {self.max_train_steps} steps"
        elif self.max_train_minutes is None:
            decay = f"then linear decay to 0 at step {self.max_train_steps}"
        elif self.max_train_steps is None:
            decay = f"then linear decay to 0 at minute {self.max_train_minutes:g}"
        else:
            decay = (
                f"then linear decay to 0 at step {self.max_train_steps} or minute {self.max_train_minutes:g}, "
                "whichever comes first"
            )
        if self.lr_scheduler_type == "linear" and self.decay_fraction < 1:
            decay = decay.replace(
                "then linear decay", f"then the full rate for {1 - self.decay_fraction:.0%} of the budget and linear decay"
            )
        return (
            f"Plan: {self.num_images} images, {self.per_device_batch_size} per device and batch, {self.images_per_step} "
            f"per step, {self.steps_per_epoch} steps an epoch; {length}; warm-up {warmup}; {decay}."
        )

    def to_dict(self) -> dict:
        return asdict(self)


def default_batch_size(num_images: int, num_processes: int = 1, max_batch_size: int = MAX_BATCH_SIZE) -> int:
    """
    The batch size per device when none is given: `max_batch_size`, halved while an epoch of `num_images` over
    `num_processes` devices would have fewer than `MIN_STEPS_PER_EPOCH` batches (down to 1).
    """
    batch_size = max_batch_size
    while batch_size > 1 and math.ceil(num_images / (batch_size * num_processes)) < MIN_STEPS_PER_EPOCH:
        batch_size //= 2
    return batch_size


def default_warmup_steps(num_training_steps: int | None) -> int:
    """
    Warm-up steps when none are given: `WARMUP_FRACTION` of `num_training_steps`, rounded down (a run of fewer than 20
    steps starts at the full rate), at most `MAX_WARMUP_STEPS`; `MAX_WARMUP_STEPS` without a step count (a time
    budget then ends the warm-up, see `plan_training`).
    """
    if num_training_steps is None:
        return MAX_WARMUP_STEPS
    return min(MAX_WARMUP_STEPS, math.floor(WARMUP_FRACTION * num_training_steps))


def plan_max_objects(most_objects: int, preset_max_objects: int) -> int:
    """
    Objects per training sequence of a new model: `preset_max_objects` when it holds `most_objects` (the most objects
    of a training image), otherwise `most_objects` rounded up to a multiple of `MAX_OBJECTS_MULTIPLE`, at most
    `MAX_PLANNED_OBJECTS` (an image with more keeps that many of its objects in its sequence).
    """
    if most_objects <= preset_max_objects:
        return preset_max_objects
    rounded = math.ceil(most_objects / MAX_OBJECTS_MULTIPLE) * MAX_OBJECTS_MULTIPLE
    return max(preset_max_objects, min(MAX_PLANNED_OBJECTS, rounded))


def _check_positive(name: str, value) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"`{name}` must be positive, got {value!r}.")


def plan_training(
    num_images: int,
    *,
    per_device_batch_size: int | None = None,
    num_epochs: float | None = None,
    max_train_steps: int | None = None,
    max_train_minutes: float | None = None,
    num_warmup_steps: int | None = None,
    num_processes: int = 1,
    gradient_accumulation_steps: int = 1,
    lr_scheduler_type: str = "linear",
    decay_fraction: float = 1.0,
    max_batch_size: int = MAX_BATCH_SIZE,
    default_num_epochs: int = DEFAULT_NUM_EPOCHS,
) -> TrainingPlan:
    """
    Plans a run from the data and the budget; every value given is kept as it is.

    Args:
        num_images (`int`): training images.
        per_device_batch_size (`int`, *optional*): default `default_batch_size(num_images, num_processes,
            max_batch_size)`.
        num_epochs (`float`, *optional*): the step budget in epochs (ignored when `max_train_steps` is given).
        max_train_steps (`int`, *optional*): the step budget in updates.
        max_train_minutes (`float`, *optional*): the time budget; alone, the run lasts as many steps as fit in it.
        num_warmup_steps (`int`, *optional*): default `default_warmup_steps` of the planned steps and, with a time
            budget, `WARMUP_FRACTION` of its minutes, whichever ends first (only for the `linear` schedule, which
            `training_setup.LinearDecayToBudget` runs).
        num_processes (`int`, *optional*, defaults to 1): devices; the batch size is per device.
        gradient_accumulation_steps (`int`, *optional*, defaults to 1): batches per update.
        lr_scheduler_type (`str`, *optional*, defaults to `"linear"`): the schedule after the warm-up. Another
            schedule than `linear` needs a step budget.
        decay_fraction (`float`, *optional*, defaults to 1.0): see `TrainingPlan.decay_fraction`.
        max_batch_size (`int`, *optional*, defaults to `MAX_BATCH_SIZE`): the default batch of a large set.
        default_num_epochs (`int`, *optional*, defaults to `DEFAULT_NUM_EPOCHS`): epochs of a run given no budget (at
            least `MIN_PLANNED_STEPS` steps).

    Returns:
        `TrainingPlan`.

    Raises:
        `ValueError` naming the value: a count that is not positive, a negative warm-up, or a schedule other than
        `linear` with only a time budget.
    """
    if not num_images >= 1:
        raise ValueError(f"The training set is empty (`num_images` {num_images!r}): there is nothing to plan.")
    for name, value in (
        ("per_device_batch_size", per_device_batch_size),
        ("num_epochs", num_epochs),
        ("max_train_steps", max_train_steps),
        ("max_train_minutes", max_train_minutes),
        ("num_processes", num_processes),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
        ("max_batch_size", max_batch_size),
        ("default_num_epochs", default_num_epochs),
    ):
        _check_positive(name, value)
    if num_warmup_steps is not None and num_warmup_steps < 0:
        raise ValueError(f"`num_warmup_steps` must be at least 0, got {num_warmup_steps!r}.")

    batch_size = per_device_batch_size or default_batch_size(num_images, num_processes, max_batch_size)
    steps_per_epoch = math.ceil(math.ceil(num_images / batch_size) / num_processes / gradient_accumulation_steps)
    if max_train_steps is None and num_epochs is not None:
        max_train_steps = math.ceil(num_epochs * steps_per_epoch)
    elif max_train_steps is None and max_train_minutes is None:
        max_train_steps = max(default_num_epochs * steps_per_epoch, MIN_PLANNED_STEPS)
    if max_train_steps is None and lr_scheduler_type != "linear":
        raise ValueError(
            f"The `{lr_scheduler_type}` schedule needs a number of steps; with only a time budget "
            f"(max_train_minutes {max_train_minutes!r}) give max_train_steps or num_epochs, or use `linear`."
        )
    epochs = None if max_train_steps is None else math.ceil(max_train_steps / steps_per_epoch)

    warmup_minutes = None
    if num_warmup_steps is None:
        num_warmup_steps = default_warmup_steps(max_train_steps)
        if max_train_minutes is not None and lr_scheduler_type == "linear":
            warmup_minutes = WARMUP_FRACTION * max_train_minutes
    return TrainingPlan(
        num_images=num_images,
        per_device_batch_size=batch_size,
        images_per_step=batch_size * num_processes * gradient_accumulation_steps,
        steps_per_epoch=steps_per_epoch,
        max_train_steps=max_train_steps,
        num_epochs=epochs,
        max_train_minutes=max_train_minutes,
        warmup_steps=num_warmup_steps,
        warmup_minutes=warmup_minutes,
        lr_scheduler_type=lr_scheduler_type,
        decay_fraction=decay_fraction,
    )


__all__ = [
    "DEFAULT_NUM_EPOCHS",
    "MAX_BATCH_SIZE",
    "MAX_WARMUP_STEPS",
    "MIN_PLANNED_STEPS",
    "MIN_STEPS_PER_EPOCH",
    "TrainingPlan",
    "WARMUP_FRACTION",
    "default_batch_size",
    "default_warmup_steps",
    "plan_training",
]
