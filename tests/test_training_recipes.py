"""Named recipes of examples/train.py: a recipe sets the paper's values, options given explicitly win, the global
batch is split over the processes."""

import pytest
from helpers import load_example

from pix2seq_hf.training_recipes import RECIPES, recipe_defaults


@pytest.fixture(scope="module")
def train_module():
    return load_example("train")


def test_recipe_sets_its_values(train_module, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    args = train_module.parse_args(["--recipe", "pix2seq-coco-finetune"])
    assert (args.image_size, args.augmentation, args.learning_rate, args.weight_decay) == (640, "finetune", 3e-5, 0.05)
    assert (args.num_train_epochs, args.per_device_train_batch_size, args.num_warmup_steps) == (60, 128, 2 * 925)
    args = train_module.parse_args(["--recipe", "pix2seq-o365-pretrain"])
    assert (args.config_preset, args.image_size, args.max_train_steps) == ("r50", 640, 400_000)
    assert (args.augmentation, args.lr_scheduler_type, args.num_warmup_steps) == ("pretrain", "cosine", 20_000)
    assert args.per_device_train_batch_size == 256
    # Without a recipe, the script's own defaults.
    args = train_module.parse_args([])
    assert (args.image_size, args.learning_rate, args.per_device_train_batch_size) == (None, None, None)


def test_explicit_options_override_the_recipe(train_module, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--learning_rate", "5e-4", "--recipe", "pix2seq-o365-pretrain", "--image_size", "512"]
    args = train_module.parse_args(argv + ["--per_device_train_batch_size", "3", "--max_train_steps", "7"])
    assert (args.learning_rate, args.image_size, args.per_device_train_batch_size, args.max_train_steps) == (
        5e-4, 512, 3, 7
    )
    assert (args.augmentation, args.weight_decay, args.config_preset) == ("pretrain", 0.05, "r50")


def test_global_batch_is_split_over_processes_and_accumulation(train_module, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "8")
    args = train_module.parse_args(["--recipe", "pix2seq-o365-pretrain", "--gradient_accumulation_steps", "2"])
    assert args.per_device_train_batch_size == 16
    assert recipe_defaults("pix2seq-coco-finetune", num_processes=16)["per_device_train_batch_size"] == 8
    with pytest.raises(ValueError, match=r"global batch of 128 images, which 3 processes x 1 accumulation"):
        recipe_defaults("pix2seq-coco-finetune", num_processes=3)
    # An explicit per-process batch needs no split.
    assert recipe_defaults("pix2seq-coco-finetune", num_processes=3, per_device_train_batch_size=5)[
        "per_device_train_batch_size"
    ] == 5


def test_recipe_options_are_options_of_the_script(train_module):
    defaults = vars(train_module.parse_args([]))
    for recipe in RECIPES.values():
        assert set(recipe.options) <= set(defaults), recipe.name
        assert recipe.source
