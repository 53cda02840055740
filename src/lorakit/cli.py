"""``lorakit`` command line: parses flags, calls one typed function per subcommand, prints.

User errors (``LoraKitError``) become one line on stderr and exit code 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import types
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
    "serve": "lorakit.commands.serve",
    "sweep": "lorakit.commands.sweep",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line, not usage plus a line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class BoolFlag(argparse.Action):
    """``--name`` sets True, ``--no_name`` sets False."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, not (option_string or "").startswith("--no_"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


class OneOrMany(argparse.Action):
    """``nargs="+"`` where a single value stays a string (a regex, ``all-linear``, names)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values[0] if len(values) == 1 else values)


def add_bool_flag(
    parser: argparse.ArgumentParser,
    name: str,
    help: str,
    dest: str | None = None,
    default: Any = None,
) -> None:
    """``--name`` / ``--no_name``; argparse's ``--no-name`` spelling still works, unlisted."""
    dest = dest or name
    parser.add_argument(
        f"--{name}", f"--no_{name}", dest=dest, action=BoolFlag, default=default, help=help
    )
    parser.add_argument(
        f"--no-{name}", dest=dest, action="store_false", default=default, help=argparse.SUPPRESS
    )


def add_config_flags(
    parser: argparse.ArgumentParser,
    only: Sequence[str] | None = None,
    help_for: dict[str, str] | None = None,
    extra_names: dict[str, Sequence[str]] | None = None,
) -> None:
    """One flag per config field (``--rank``, ``--learning_rate`` ...), default: not given.

    Args:
        only: flag names this command takes (default: all); a field comes with all its aliases.
        help_for: this command's help for a flag, where the field's own does not say it.
        extra_names: more names for a flag in this command, e.g. eval's ``--batch_size``.
    """
    from lorakit.config import flag_table

    help_for, extra_names = help_for or {}, extra_names or {}
    for dotted, (names, tp, help_text) in flag_table().items():
        if only is not None and not set(names) & set(only):
            continue
        names = (*names, *(n for flag in names for n in extra_names.get(flag, ())))
        help_text = next((help_for[n] for n in names if n in help_for), help_text)
        dest = f"cfg:{dotted}"
        if tp is bool:
            add_bool_flag(parser, names[0], help_text, dest, argparse.SUPPRESS)
            continue
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        origin = typing.get_origin(tp)
        if origin is types.UnionType:  # lora.target_modules: list[str] | str
            kwargs.update(nargs="+", action=OneOrMany, metavar="NAME")
        elif origin is list:
            kwargs.update(nargs="+", metavar="STR")
        elif origin is typing.Literal:
            kwargs["choices"] = typing.get_args(tp)
        else:
            kwargs["type"] = tp
            kwargs["metavar"] = tp.__name__.upper()
        parser.add_argument(*(f"--{n}" for n in names), **kwargs)


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
        # Also after the command; SUPPRESS keeps a `lorakit -v COMMAND` from being reset.
        p.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logging"
        )
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
    except OSError as e:  # backstop: a path or disk problem the up-front checks could not see
        from lorakit.paths import os_error_message

        message = os_error_message(e)
        if message is None:
            raise
        logging.getLogger(__name__).debug("%s", message, exc_info=True)
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
