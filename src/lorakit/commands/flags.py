"""Flag helpers the subcommands share: ``--flag/--no_flag`` booleans, one flag per config
field, and the overrides they collect. Apart from ``cli`` so that no command imports it back."""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Sequence
from typing import Any


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
