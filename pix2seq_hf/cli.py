"""The `--help` layout shared by the command-line scripts (the examples and the checkpoint converter)."""

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


__all__ = ["HelpFormatter"]
