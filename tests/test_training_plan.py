"""The plan of a training run (batch, epochs, warm-up, decay, a new model's objects per sequence) from the data and the
budget: the planner, the schedule that ends the warm-up by steps or by time, and examples/train.py on a 30-image COCO
json with a step and a time budget."""

import json
import math
import time

import pytest
from helpers import load_example, write_coco_set

from pix2seq_hf.data import objects_per_image
from pix2seq_hf.training_plan import (
    MAX_PLANNED_OBJECTS,
    MAX_WARMUP_STEPS,
    MIN_PLANNED_STEPS,
    WARMUP_FRACTION,
    default_batch_size,
    plan_max_objects,
    plan_training,
)
from pix2seq_hf.training_setup import LinearDecayToBudget


# ----- the planner ---------------------------------------------------------------------------------------------------


def test_a_small_set_gets_small_batches_and_many_short_epochs():
    plan = plan_training(30)
    # batch 8: the largest power of two with 4 steps an epoch (16 would give 2)
    assert plan.per_device_batch_size == 8 and plan.steps_per_epoch == 4
    assert plan.max_train_steps == MIN_PLANNED_STEPS and plan.num_epochs == MIN_PLANNED_STEPS // 4
    assert plan.warmup_steps == MAX_WARMUP_STEPS and plan.warmup_minutes is None
    # A large set keeps the batch of 32 and 50 epochs.
    coco = plan_training(118287)
    assert coco.per_device_batch_size == 32 and coco.num_epochs == 50 and coco.warmup_steps == MAX_WARMUP_STEPS
    assert default_batch_size(3) == 1 and default_batch_size(64, num_processes=2) == 8


def test_only_a_time_budget_lets_the_minutes_decide():
    plan = plan_training(30, max_train_minutes=10)
    assert plan.max_train_steps is None and plan.num_epochs is None
    assert plan.warmup_minutes == pytest.approx(WARMUP_FRACTION * 10)
    text = plan.describe()
    assert "until 10 minutes" in text and "0.5 minutes" in text and "linear decay to 0 at minute 10" in text
    with pytest.raises(ValueError, match="`cosine` schedule needs a number of steps"):
        plan_training(30, max_train_minutes=10, lr_scheduler_type="cosine")
    # Another schedule warms up over the planned steps only.
    assert plan_training(30, max_train_minutes=10, max_train_steps=400, lr_scheduler_type="cosine").warmup_minutes is None


def test_given_values_win():
    plan = plan_training(
        30, per_device_batch_size=16, num_epochs=3, max_train_minutes=5, num_warmup_steps=7, num_processes=2,
        gradient_accumulation_steps=2,
    )  # fmt: skip
    # 2 batches of 16 over 2 processes: 1 batch each, 1 update an epoch (accumulation rounds up)
    assert (plan.per_device_batch_size, plan.images_per_step, plan.steps_per_epoch) == (16, 64, 1)
    assert (plan.max_train_steps, plan.num_epochs, plan.warmup_steps, plan.warmup_minutes) == (3, 3, 7, None)
    assert plan_training(30, max_train_steps=10, num_epochs=100).max_train_steps == 10


def test_the_synthetic_default_run_keeps_its_schedule():
    plan = plan_training(4000, max_batch_size=8, num_epochs=10, max_train_minutes=13.5)
    assert (plan.per_device_batch_size, plan.max_train_steps, plan.warmup_steps) == (8, 5000, 100)
    assert plan.warmup_minutes == pytest.approx(0.675)
    assert plan.to_dict()["max_train_minutes"] == 13.5


@pytest.mark.parametrize("num_images", [1, 7, 30, 500, 4000])
def test_the_planned_warmup_is_within_a_tenth_of_the_planned_steps(num_images):
    for steps in list(range(1, 60)) + [99, 100, 101, 1999, 2000, 5000, 10**6]:
        plan = plan_training(num_images, max_train_steps=steps)
        assert plan.warmup_steps <= 0.1 * steps, (num_images, steps)
    for epochs in (1, 2, 10, 300):
        plan = plan_training(num_images, num_epochs=epochs)
        assert plan.warmup_steps <= 0.1 * plan.max_train_steps


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="empty"):
        plan_training(0)
    with pytest.raises(ValueError, match="`max_train_minutes` must be positive, got -1"):
        plan_training(10, max_train_minutes=-1)
    with pytest.raises(ValueError, match="`num_warmup_steps` must be at least 0"):
        plan_training(10, num_warmup_steps=-2)


# ----- the schedule ends the warm-up by steps or by time -------------------------------------------------------------


def _run(schedule: LinearDecayToBudget, seconds_per_step: float, max_steps: int | None = None) -> list[float]:
    """The multipliers of the updates of a run at an even pace, until the step or the time budget is spent."""
    multipliers, step = [], 0
    while True:
        schedule.set_elapsed(step * seconds_per_step)
        multipliers.append(schedule(step))
        step += 1
        if (max_steps is not None and step >= max_steps) or step * seconds_per_step >= (schedule.budget_seconds or 1e9):
            return multipliers


@pytest.mark.parametrize("seconds_per_step", [0.05, 0.7, 3.0, 40.0])
def test_a_time_budget_ends_the_warmup_within_a_tenth_of_the_steps_at_any_pace(seconds_per_step):
    plan = plan_training(30, max_train_minutes=10)
    schedule = LinearDecayToBudget(plan.warmup_steps, None, 600.0, plan.warmup_minutes * 60)
    multipliers = _run(schedule, seconds_per_step)
    assert schedule.warmup_ended_at is not None and schedule.warmup_ended_at <= 0.1 * len(multipliers)
    # the rate at the end of the warm-up is the time's share left of the budget, then it falls to 0 with the minutes
    ended = schedule.warmup_ended_at
    assert multipliers[ended] == pytest.approx(min(1.0, 1 - ended * seconds_per_step / 600)) and multipliers[ended] > 0.9
    assert multipliers[-1] <= max(0.1, 2 * seconds_per_step / 600)
    decay = multipliers[schedule.warmup_ended_at :]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(decay, decay[1:]))


def test_with_both_budgets_the_first_spent_ends_warmup_and_decay():
    # Fast: 400 steps end before the minutes, and the warm-up ends at its 20 steps.
    schedule = LinearDecayToBudget(20, 400, 600.0, 30.0)
    multipliers = _run(schedule, 0.1, max_steps=400)
    assert schedule.warmup_ended_at == 20 and multipliers[10] == pytest.approx(0.5)
    assert multipliers[210] == pytest.approx(0.5)
    # Slow: the minutes end first; the warm-up ends at 30 s, step 3.
    schedule = LinearDecayToBudget(20, 400, 600.0, 30.0)
    multipliers = _run(schedule, 10.0, max_steps=400)
    assert schedule.warmup_ended_at == 3 and len(multipliers) == 60
    assert multipliers[2] == pytest.approx(2 / 3) and multipliers[3] == pytest.approx(1 - 30 / 600)
    assert multipliers[59] == pytest.approx(1 - 590 / 600)
    with pytest.raises(ValueError, match="warmup_seconds"):
        LinearDecayToBudget(20, 400, 600.0, 600.0)
    with pytest.raises(ValueError, match="needs an end"):
        LinearDecayToBudget(20, None)


# ----- examples/train.py on a 30-image COCO json ---------------------------------------------------------------------

# A small model: the tiny preset with timm's test ResNet and narrow layers.
SMALL_OVERRIDES = {"backbone": "test_resnet", "encoder_hidden_size": 32, "decoder_hidden_size": 32,
                   "encoder_ffn_dim": 64, "decoder_ffn_dim": 64}  # fmt: skip
SMALL_MODEL = json.dumps(SMALL_OVERRIDES)


@pytest.fixture(scope="module")
def coco_set(tmp_path_factory):
    return write_coco_set(tmp_path_factory.mktemp("coco"), 30, size=48)


def _train(train, coco_set, output_dir, *extra) -> dict:
    annotations, images = coco_set
    argv = [
        "--coco_annotations", str(annotations), "--coco_images", str(images), "--config_overrides", SMALL_MODEL,
        "--image_size", "48", "--num_threads", "1", "--seed", "0", "--output_dir", str(output_dir), *extra,
    ]  # fmt: skip
    assert train.main(argv) == 0
    return json.loads((output_dir / "all_results.json").read_text())


def test_a_step_budget_on_a_small_coco_set_plans_batch_epochs_and_warmup(coco_set, tmp_path, caplog):
    train = load_example("train")
    with caplog.at_level("INFO"):
        results = _train(train, coco_set, tmp_path / "run", "--max_train_steps", "40")
    plan = results["plan"]
    assert (plan["per_device_batch_size"], plan["steps_per_epoch"], plan["num_epochs"]) == (8, 4, 10)
    assert results["train_steps"] == plan["max_train_steps"] == 40
    assert plan["warmup_steps"] == 2 and plan["warmup_ended_at_step"] == 2
    assert plan["warmup_ended_at_step"] <= 0.1 * plan["max_train_steps"]
    assert "Plan: 30 images, 8 per device and batch" in caplog.text and "warm-up 2 steps" in caplog.text


def test_the_help_states_the_planned_defaults(capsys):
    train = load_example("train")
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "Default: 5% of the planned steps (at most 100)" in text
    assert "halved while an epoch would have fewer than 4 steps" in text and "--backbone_checkpoint" in text


class _Clock:
    """Stands in for the `time` module of examples/train.py: each reading is `tick` seconds after the last."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def time(self) -> float:
        self.now += self.tick
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_a_time_budget_on_a_small_coco_set_ends_the_warmup_within_a_tenth_of_the_steps(
    coco_set, tmp_path, monkeypatch
):
    train = load_example("train")
    # A deterministic clock: the run's pace is the same on any machine (a few readings per step of 0.1 s each).
    monkeypatch.setattr(train, "time", _Clock(0.1))
    results = _train(train, coco_set, tmp_path / "run", "--max_train_minutes", "0.3")
    plan = results["plan"]
    assert plan["max_train_steps"] is None and plan["num_epochs"] is None
    assert plan["warmup_minutes"] == pytest.approx(0.015)
    steps = results["train_steps"]
    assert steps >= 30  # the minutes, not a step count, ended the run
    assert plan["warmup_ended_at_step"] is not None and plan["warmup_ended_at_step"] <= math.floor(0.1 * steps)


# ----- objects per sequence from the data ----------------------------------------------------------------------------


def test_a_new_model_gets_sequences_for_the_fullest_training_image():
    assert plan_max_objects(10, preset_max_objects=10) == 10 and plan_max_objects(3, preset_max_objects=100) == 100
    assert plan_max_objects(11, preset_max_objects=10) == 16 and plan_max_objects(27, preset_max_objects=10) == 32
    assert plan_max_objects(150, preset_max_objects=10) == MAX_PLANNED_OBJECTS == 100
    assert plan_max_objects(150, preset_max_objects=120) == 120


def test_objects_per_image_reads_the_counts_without_decoding():
    from pix2seq_hf.data import make_synthetic_detection_dataset

    dataset = make_synthetic_detection_dataset(6, seed=3, image_size=32, max_objects=4)
    counts = [len(objects["bbox"]) for objects in dataset["objects"]]
    assert objects_per_image(dataset).tolist() == counts
    assert objects_per_image(dataset.select([4, 1])).tolist() == [counts[4], counts[1]]
    assert objects_per_image(dataset.select([])).tolist() == []

    # Crowd regions are left out, as training leaves them out.
    def first_object_of_odd_images_is_crowd(example, index):
        objects = example["objects"]
        return {"objects": {**objects, "iscrowd": [index % 2] + [0] * (len(objects["bbox"]) - 1)}}

    crowded = dataset.map(first_object_of_odd_images_is_crowd, with_indices=True)
    assert objects_per_image(crowded).tolist() == [count - index % 2 for index, count in enumerate(counts)]


def test_build_model_and_processor_sizes_a_new_model_from_the_object_counts(caplog):
    from pix2seq_hf.training_setup import build_model_and_processor

    id2label = {0: "coin"}
    model, processor = build_model_and_processor(
        id2label, objects_per_image=[3, 27, 5], config_overrides=SMALL_OVERRIDES
    )
    assert model.config.max_objects == processor.max_objects == 32
    assert model.config.max_position_embeddings >= 5 * 32 + 1
    # Given values win; images with more objects than the sequence holds are named in a warning.
    with caplog.at_level("WARNING"):
        model, processor = build_model_and_processor(
            id2label, objects_per_image=[3, 27, 12], max_objects=12, config_overrides=SMALL_OVERRIDES
        )
    assert model.config.max_objects == processor.max_objects == 12
    assert "1 training images hold more than max_objects 12 objects" in caplog.text
    # Without counts, or with few objects, the preset's 10.
    assert build_model_and_processor(id2label, config_overrides=SMALL_OVERRIDES)[0].config.max_objects == 10
    few = build_model_and_processor(id2label, objects_per_image=[2], config_overrides=SMALL_OVERRIDES)
    assert few[1].max_objects == 10


def test_train_script_sizes_sequences_from_a_crowded_coco_json(coco_set, tmp_path):
    annotations, images = coco_set
    data = json.loads(annotations.read_text())
    # Image 1 gets 14 more copies of its first object: 15 or more objects, more than the tiny preset's 10.
    first = next(a for a in data["annotations"] if a["image_id"] == 1)
    next_id = max(a["id"] for a in data["annotations"]) + 1
    data["annotations"] += [{**first, "id": next_id + i} for i in range(14)]
    crowded = tmp_path / "crowded.json"
    crowded.write_text(json.dumps(data))
    train = load_example("train")
    _train(train, (crowded, images), tmp_path / "run", "--max_train_steps", "1", "--validation_split", "none")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["max_objects"] == 16
