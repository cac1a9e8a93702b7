"""How zoo's command lines report errors: one line and exit code 2, the traceback only when asked.

A user's mistake (unknown model, bad recipe, unreadable file, ``--out`` under a file, disk full, a
checkpoint of another architecture) is one line on stderr, never a traceback; ``--debug`` anywhere on the
command line or ``ZOO_DEBUG=1`` re-raises so the traceback shows. Warnings print as one line too.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Callable, Sequence

EXIT_ERROR = 2
DEBUG_FLAG = "--debug"

# exceptions whose message is written for the user; anything else is reported with its type and a hint
_USER_FACING = (ValueError, OSError, RuntimeError, ImportError)


class ZooArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (the default prints the whole usage first: pages for ``zoo train``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def split_debug_flag(argv: Sequence[str] | None) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether tracebacks are wanted (the flag or ``ZOO_DEBUG``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in args or os.environ.get("ZOO_DEBUG", "").strip() not in ("", "0", "false", "no")
    return [a for a in args if a != DEBUG_FLAG], debug


def one_line(err: BaseException) -> str:
    """The exception as one line: its message (joined lines), prefixed with its type when that helps."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    if isinstance(err, KeyError) and len(err.args) == 1:
        text = f"missing key {err.args[0]!r}"
    if not isinstance(err, _USER_FACING) or not text:
        text = f"{type(err).__name__}: {text}" if text else type(err).__name__
        text += f" (unexpected; rerun with {DEBUG_FLAG} or ZOO_DEBUG=1 for the traceback)"
    return text


def _format_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ANN001 - warnings' signature
    return f"warning: {message}\n"


def run_reporting_errors(fn: Callable[[], int], prog: str, debug: bool) -> int:
    """Run ``fn`` (a command); an exception becomes ``'<prog>: error: <one line>'`` and exit code 2."""
    previous = warnings.formatwarning
    if not debug:
        warnings.formatwarning = _format_warning
    try:
        return fn()
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the one place every command's errors are reported
        if debug:
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
        return EXIT_ERROR
    finally:
        warnings.formatwarning = previous


def parse_json_mapping(text: str, flag: str) -> dict:
    """A ``--*-kwargs`` JSON value as a dict; a clear error naming the flag otherwise."""
    import json

    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {text!r} is not valid JSON ({err.msg} at column {err.colno}); e.g. "
                         '\'{"key": 1}\'') from None  # fmt: skip
    if not isinstance(value, dict):
        raise ValueError(f"{flag} {text!r} must be a JSON object, e.g. '{{\"key\": 1}}'")
    return value


def _int_at_least(low: int, name: str):
    def convert(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    convert.__name__ = name  # argparse names the type in its messages
    return convert


positive_int = _int_at_least(1, "positive int")
non_negative_int = _int_at_least(0, "non-negative int")
