"""The ``pill`` command: a thin map from sub-command to a library function.

Every error a user can cause (a :class:`~pill.errors.PillError`, or an ``OSError`` such as a
missing or unreadable file) is printed as one line ``pill <command>: error: ...`` with exit
code 1; argparse's own errors keep exit code 2 and the usage text.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import PillError

# Modules that add sub-commands through ``register(subparsers)``.
_COMMAND_MODULES = ["pill.commands", "pill.data.commands", "pill.eval.commands", "pill.train.commands",
                    "pill.eval.run_commands", "pill.web.commands"]


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="pill", description="Plug a frozen vision encoder into a frozen LLM.")
    parser.add_argument("--version", action="version", version=f"pill {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register(sub)
    _name_commands(parser)
    return parser


def _name_commands(parser: argparse.ArgumentParser) -> None:
    """Give every (sub-)parser the default ``_prog``: its full name, e.g. ``pill data inspect``."""
    parser.set_defaults(_prog=parser.prog)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                _name_commands(child)


def error_line(e: BaseException) -> str:
    """The message of a user error on one line (an ``OSError`` as ``<file>: <reason>``)."""
    if isinstance(e, OSError) and not isinstance(e, PillError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except (PillError, OSError) as e:
        print(f"{args._prog}: error: {error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


# -- argparse value types, shared by the sub-commands (a bad value is argparse's usual exit 2) --

def positive_int(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    return _int_at_least(text, 1, "a positive whole number")


def non_negative_int(text: str) -> int:
    """An argparse type: a whole number >= 0."""
    return _int_at_least(text, 0, "a whole number >= 0")


def port(text: str) -> int:
    """An argparse type: a TCP port 0-65535 (0 picks a free one)."""
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number 0-65535, got {text!r}")
    return int(text)


def _int_at_least(text: str, low: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


if __name__ == "__main__":
    sys.exit(main())
