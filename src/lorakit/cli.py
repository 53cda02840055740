"""``lorakit`` command line: parses flags, calls one typed function per subcommand, prints.

User errors (``LoraKitError``) become one line on stderr and exit code 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from lorakit.errors import LoraKitError

# Subcommand name -> module that defines it (imported lazily: torch is slow to import). The
# commands' shared flag helpers are in lorakit.commands.flags, which imports nothing back.
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
