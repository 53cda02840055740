"""``lorakit`` command line: parses flags, calls one typed function per subcommand, prints.

User errors (``LoraKitError``) become one line on stderr and exit code 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from lorakit.errors import LoraKitError

# Subcommand name -> module that defines it (imported lazily: torch is slow to import).
COMMANDS = {
    "train": "lorakit.commands.train",
    "eval": "lorakit.commands.eval",
    "doctor": "lorakit.commands.doctor",
    "predict": "lorakit.commands.predict",
    "merge": "lorakit.commands.merge",
    "export": "lorakit.commands.export",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, not usage plus a line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def add_config_flags(parser: argparse.ArgumentParser, only: Sequence[str] | None = None) -> None:
    """One flag per config field (``--rank``, ``--learning_rate`` ...), default: not given."""
    from lorakit.config import flag_table

    for flag, (dotted, tp, help_text) in flag_table().items():
        if only is not None and flag not in only:
            continue
        kwargs: dict[str, Any] = {
            "dest": f"cfg:{dotted}",
            "default": argparse.SUPPRESS,
            "help": help_text,
        }
        origin = typing.get_origin(tp)
        if tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif origin is list:
            kwargs["nargs"] = "+"
        elif origin is typing.Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            kwargs["type"] = tp
            kwargs["metavar"] = tp.__name__.upper()
        parser.add_argument(f"--{flag}", **kwargs)


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}


def build_parser() -> Parser:
    import importlib

    parser = Parser(prog="lorakit", description="LoRA fine-tuning for text classifiers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except LoraKitError as e:
        print(f"lorakit {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"lorakit {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
