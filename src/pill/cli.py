"""The ``pill`` command: a thin map from sub-command to a library function."""
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except PillError as e:
        print(f"pill {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


if __name__ == "__main__":
    sys.exit(main())
