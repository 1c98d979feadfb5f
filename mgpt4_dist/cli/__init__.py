"""The command-line layer: what every `mgpt4-*` command shares.

`user_errors` turns a `UserError` (config, data, weights, checkpoint mismatch, unsupported
setting, disk full) into one line `mgpt4-X: error: <message>` on stderr and exit status 2;
anything else is a bug and keeps its traceback. `HelpFormatter` makes every `--help` state its
defaults and keep the examples of its epilog as written; `ArgumentParser` uses it and reports
usage errors in one line as well.
"""
from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable, Optional, Tuple, Type

from mgpt4_dist.errors import EXIT_USER_ERROR, UserError, one_line


def report_user_error(prog: str, error: BaseException, show: bool = True) -> int:
    """Print `prog: error: message` (one line) unless `show` is false; return the user-error exit code."""
    if show:
        sys.stdout.flush()
        print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr, flush=True)
    return EXIT_USER_ERROR


def user_errors(prog: str, also: Tuple[Type[BaseException], ...] = ()) -> Callable:
    """Decorate `main(argv) -> int`: a UserError (or one of `also`: built-in errors that modules
    outside the CLI layer still raise for a path the user gave) becomes one line and exit 2."""
    caught = (UserError,) + tuple(also)

    def wrap(main: Callable[[Optional[list]], int]) -> Callable[[Optional[list]], int]:
        @functools.wraps(main)
        def run(argv: Optional[list] = None) -> int:
            try:
                return main(argv)
            except caught as e:
                return report_user_error(prog, e)

        return run

    return wrap


EXAMPLES_HEADER = "examples:\n"


class HelpFormatter(argparse.HelpFormatter):
    """Adds `(default: X)` to every option that has a default; the examples epilog keeps its lines."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith(EXAMPLES_HEADER):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is argparse.SUPPRESS or action.required
                or default is False or not (action.option_strings or action.nargs in ("?", "*"))
                or default == []):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with `HelpFormatter`, whose usage errors are one line too (and exit 2, as argparse's)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def examples(*lines: str) -> str:
    """An epilog: `examples:` followed by the given command lines, kept as written."""
    return EXAMPLES_HEADER + "\n".join(f"  {line}" for line in lines)
