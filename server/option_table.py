"""`nfmig serve` options declared as a table over a settings dataclass: each row an option,
the field it sets, how its text is read, its metavar and help (the field's default is
appended). One table is both the argument group and the way back to the settings."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

Settings = TypeVar("Settings")
# option, settings field, parser of its text, metavar, help
Row = tuple[str, str, Callable[[str], Any], str, str]


def seconds(least: float, most: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be between {least:g} and {most:g} seconds")
        return value
    return parse


def number(least: int, most: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(f"must be between {least} and {most}")
        return value
    return parse


def add_group(parser: argparse.ArgumentParser, title: str, description: str,
              defaults: Any, rows: Sequence[Row], prefix: str) -> None:
    """The rows as an argument group, each option stored as ``prefix`` + its field."""
    group = parser.add_argument_group(title, description)
    for option, name, kind, metavar, text in rows:
        default = getattr(defaults, name)
        group.add_argument(option, dest=f"{prefix}{name}", type=kind, metavar=metavar,
                           default=default, help=f"{text} (default {default:g})")


def settings_from(cls: type[Settings], args: argparse.Namespace, prefix: str) -> Settings:
    """``cls`` with every field the parsed options set (the others keep their defaults)."""
    names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    return cls(**{name: getattr(args, f"{prefix}{name}") for name in names
                  if hasattr(args, f"{prefix}{name}")})
