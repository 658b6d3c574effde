"""One set of run options (`pix2seq_hf.training_options`) for examples/train.py, examples/run_object_detection.py and
examples/evaluate.py: the same defaults, the same recipe, the same checks, errors that name the option."""

import dataclasses

import pytest
from helpers import load_example

from pix2seq_hf.data import load_detection_splits
from pix2seq_hf.training_options import (
    DataOptions,
    EvaluationOptions,
    ModelOptions,
    RecipeOptions,
    RunOptions,
)


@pytest.fixture(scope="module")
def scripts():
    return {name: load_example(name) for name in ("train", "run_object_detection", "evaluate")}


def train_groups(train, argv):
    """examples/train.py's parsed options, one package dataclass per group."""
    args = train.parse_args(argv)
    return {cls: train.options(cls, args) for cls in (DataOptions, ModelOptions, RecipeOptions, EvaluationOptions)}


def test_every_script_parses_the_package_defaults(scripts, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    train, trainer, evaluate = scripts["train"], scripts["run_object_detection"], scripts["evaluate"]

    args = train.parse_args([])
    for cls in (DataOptions, ModelOptions, RecipeOptions, EvaluationOptions, RunOptions):
        assert train.options(cls, args) == cls(), cls.__name__

    data, model, evaluation, _, training_args = trainer.parse_args([])
    assert (data, model, evaluation) == (DataOptions(), ModelOptions(), EvaluationOptions())
    assert training_args.recipe_options() == RecipeOptions()
    assert training_args.per_device_eval_batch_size == RunOptions().per_device_eval_batch_size
    # Not the Trainer's own defaults (5e-5, 3 epochs, no weight decay, beta2 0.999, no warm-up).
    assert (training_args.learning_rate, training_args.num_train_epochs, training_args.warmup_steps) == (None,) * 3
    assert (training_args.weight_decay, training_args.adam_beta2) == (0.05, 0.95)
    assert training_args.do_train and training_args.do_eval

    data, evaluation, own = evaluate.parse_args(["--model", "some-model"])
    assert (data, evaluation) == (DataOptions(), EvaluationOptions())
    assert own.model_name_or_path == "some-model"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--recipe", "pix2seq-coco-finetune"],
        ["--learning_rate", "5e-4", "--max_train_steps", "30", "--num_warmup_steps", "3", "--eval_top_p", "0.4"],
        ["--coordinate_window", "0"],
    ],
)
def test_both_training_scripts_train_with_the_same_recipe(scripts, argv, monkeypatch):
    """The recipe, its resolution for the run and the plan are the same under Accelerate and under the Trainer."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    groups = train_groups(scripts["train"], argv)
    data, model, evaluation, _, training_args = scripts["run_object_detection"].parse_args(argv)
    recipe = training_args.recipe_options()
    assert recipe == groups[RecipeOptions]
    assert (data, model, evaluation) == (groups[DataOptions], groups[ModelOptions], groups[EvaluationOptions])
    assert data.training_augmentation == groups[DataOptions].training_augmentation
    assert evaluation.generation_kwargs() == groups[EvaluationOptions].generation_kwargs()

    resolved = recipe.resolved(data.synthetic, fine_tuning=False)
    plan = resolved.plan(4000, num_processes=1, synthetic=data.synthetic)
    training_args.do_train = True
    scripts["run_object_detection"].plan_training(training_args, resolved, 4000, data.synthetic)
    assert training_args.learning_rate == resolved.learning_rate
    assert training_args.per_device_train_batch_size == plan.per_device_batch_size
    assert training_args.warmup_steps == plan.warmup_steps
    assert training_args.max_steps == plan.max_train_steps


def test_evaluation_decodes_as_asked():
    assert EvaluationOptions().generation_kwargs() == {"do_sample": False}
    assert EvaluationOptions(eval_top_p=0.4, eval_coordinate_window=0).generation_kwargs() == {
        "do_sample": True,
        "top_p": 0.4,
        "coordinate_window": 0,
    }


def test_default_recipe_resolves_as_documented():
    scratch = RecipeOptions().resolved(synthetic=True, fine_tuning=False)
    assert (scratch.learning_rate, scratch.encoder_lr_scale) == (2e-3, 0.1)
    assert (scratch.num_train_epochs, scratch.max_train_minutes) == (10, 13.5)
    plan = scratch.plan(4000, num_processes=1, synthetic=True)
    assert (plan.per_device_batch_size, plan.max_train_steps, plan.warmup_steps) == (8, 5000, 100)
    fine_tuning = RecipeOptions(max_train_steps=7).resolved(synthetic=False, fine_tuning=True)
    assert (fine_tuning.learning_rate, fine_tuning.encoder_lr_scale, fine_tuning.max_train_minutes) == (3e-5, 1.0, None)
    assert dataclasses.replace(fine_tuning, learning_rate=1e-3).resolved(False, True).learning_rate == 1e-3


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max_train_samples", "0"], "max_train_samples must be at least 1, got 0"),
        (["--coco_annotations", "ann.json"], "coco_annotations and coco_images go together"),
        (["--num_augmentations", "0"], "num_augmentations must be at least 1"),
        (["--sequences_per_image", "0"], "sequences_per_image must be at least 1"),
        (["--config_overrides", "[1, 2]"], "config_overrides must be a JSON object"),
        (["--encoder_lr_scale", "0"], "encoder_lr_scale must be positive, got 0.0"),
        (["--adam_beta2", "1.5"], "adam_beta2 must be in [0, 1), got 1.5"),
        (["--eval_top_p", "0"], "eval_top_p must be in (0, 1]"),
        (["--coordinate_window", "-1"], "`coordinate_window` must be a non-negative int (bins), got -1"),
    ],
)
def test_a_refused_value_is_named_by_every_script(scripts, argv, message, capsys):
    for name, extra in (("train", []), ("run_object_detection", []), ("evaluate", ["--model", "m"])):
        if name == "evaluate" and argv[0] in ("--config_overrides", "--encoder_lr_scale", "--adam_beta2"):
            continue  # not options of the evaluation
        with pytest.raises(SystemExit):
            scripts[name].parse_args(argv + extra)
        assert message in capsys.readouterr().err, name


def test_package_functions_take_typed_options_and_name_them():
    with pytest.raises(ValueError, match=r"max_train_samples must be at least 1, got 0"):
        load_detection_splits(max_train_samples=0)
    with pytest.raises(ValueError, match=r"synthetic_variant must be one of \['dense', 'shapes'\], got 'sparse'"):
        load_detection_splits(DataOptions(synthetic_train_size=1), synthetic_variant="sparse")
    with pytest.raises(TypeError, match=r"Unknown data options \['seed_'\]"):
        load_detection_splits(seed_=1)


def test_the_validation_split_alone_loads_as_the_validation_split():
    """What examples/evaluate.py loads: the split to evaluate, as the validation split with its own label map."""
    options = DataOptions(synthetic_train_size=2, synthetic_validation_size=3)
    both = load_detection_splits(options, seed=5)
    alone = load_detection_splits(options, seed=5, train=False)
    assert alone.train is None and list(alone.stats) == ["validation"]
    assert alone.validation["image_id"] == both.validation["image_id"]
    assert alone.validation["objects"] == both.validation["objects"]
    assert alone.id2label == both.id2label
    with pytest.raises(ValueError, match="validation_split is 'none'"):
        load_detection_splits(options, validation_split="none", train=False)


def test_trainer_flags_of_train_py_keep_working(scripts, capsys):
    """examples/train.py's spellings of the Trainer's options are accepted by the Trainer script."""
    *_, training_args = scripts["run_object_detection"].parse_args(
        ["--max_train_steps", "12", "--num_warmup_steps", "2", "--max_train_minutes", "3", "--encoder_lr_scale", "0.5"]
    )
    assert (training_args.max_steps, training_args.warmup_steps) == (12, 2)
    assert (training_args.max_train_minutes, training_args.encoder_lr_scale) == (3, 0.5)
    with pytest.raises(SystemExit):
        scripts["run_object_detection"].parse_args(["--warmup_steps", "0.1"])
    assert "warmup_steps counts steps here" in capsys.readouterr().err
