"""What the command-line scripts (the examples and the checkpoint converter) share: the `--help` layout and checks
of their options."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """
    `--help` with the description as written (examples keep their line breaks) and each option's default shown once,
    after its help: `(default: 0.95)`. Nothing is added to a help text that already speaks of its default, to flags
    (`store_true`), or to options without a default (their help says what leaving them unset does).
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if (
            "default" in help_text.lower()
            or not action.option_strings
            or action.nargs == 0
            or action.default is None
            or action.default is argparse.SUPPRESS
        ):
            return help_text
        return help_text + " (default: %(default)s)"


def require_at_least_one(parser: argparse.ArgumentParser, args: argparse.Namespace, *names: str) -> None:
    """Stops through `parser.error` (exit status 2, the option named) when an integer option of `names` in the
    parsed `args` is below 1."""
    for name in names:
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")


__all__ = ["HelpFormatter", "require_at_least_one"]
