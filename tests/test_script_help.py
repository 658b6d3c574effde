"""`--help` of every command-line script: a description, help for every option, each default shown once."""

import argparse

import pytest

from pix2seq_hf import convert_pix2seq_original_tf_checkpoint_to_pytorch as converter
from helpers import EXAMPLES, load_example


# The user scripts of `examples/` and the benchmark scripts of `examples/benchmarks/`, as `load_example` names them.
SCRIPTS = sorted(
    str(path.relative_to(EXAMPLES).with_suffix(""))
    for path in [*EXAMPLES.glob("*.py"), *(EXAMPLES / "benchmarks").glob("*.py")]
)


class _Parsed(Exception):
    """Raised in place of parsing, carrying the parser a script built."""


def script_parsers(name: str, monkeypatch) -> list[argparse.ArgumentParser]:
    """The parsers a script builds when it reads its command line (the first one is its own)."""
    parsers = []
    original = argparse.ArgumentParser.parse_known_args

    def capture(self, args=None, namespace=None):
        parsers.append(self)
        if len(parsers) == 1 and name in ("benchmarks/benchmark_training_step", "benchmarks/recipe_ablation"):
            return original(self, [], namespace)  # its own options first, then train.py's parser
        raise _Parsed

    module = converter if name == "converter" else load_example(name)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    entry = getattr(module, "parse_args", None) or module.main
    with pytest.raises(_Parsed):
        entry([])
    return parsers


def own_actions(parser: argparse.ArgumentParser, name: str) -> list[argparse.Action]:
    actions = [
        action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS
    ]
    if name == "run_object_detection":
        # TrainingArguments' options are transformers' own; the script's dataclasses come first.
        from transformers import TrainingArguments

        inherited = {f"--{field}" for field in TrainingArguments.__dataclass_fields__}
        actions = [action for action in actions if not set(action.option_strings) & inherited]
    return actions


@pytest.mark.parametrize("name", SCRIPTS + ["converter"])
def test_help_describes_every_option_and_shows_defaults_once(name, monkeypatch):
    parser = script_parsers(name, monkeypatch)[0]
    assert parser.description and len(parser.description.strip()) > 20, f"{name}: no description"
    formatter = parser._get_formatter()
    for action in own_actions(parser, name):
        option = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and action.help.strip(), f"{name} {option}: no help"
        help_text = formatter._get_help_string(action) % {**vars(action), "prog": parser.prog}
        if action.nargs != 0 and action.default not in (None, argparse.SUPPRESS):
            assert "default" in help_text.lower(), f"{name} {option}: default {action.default!r} not shown"
        assert help_text.lower().count("default:") <= 1, f"{name} {option}: default shown twice: {help_text!r}"
    # The whole help renders (no stray `%` in a help text) and never doubles a default.
    rendered = parser.format_help()
    assert "(default: None)" not in rendered
    assert ") (default" not in rendered.replace("\n", " ")


def test_evaluate_help_leaves_out_the_training_only_data_options(capsys):
    evaluate = load_example("evaluate")
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--validation_split" in text and "--synthetic_validation_size" in text
    for option in ("--train_split", "--streaming", "--augmentation", "--max_train_samples"):
        assert option not in text


def test_train_help_prints_no_escaped_backticks(capsys):
    train = load_example("train")
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "\\`" not in text and "--adam_beta2" in text
    # The docstring's shell examples keep their line continuations.
    assert "--coco_images train2017 \\\n" in text
    assert "0.95" in text and "0.999" in text  # the paper's beta2, and the usual one it replaces
