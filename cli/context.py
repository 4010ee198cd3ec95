"""Shared pieces of the CLI: the context object, errors and output flags."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from stockade.cli.client import call
from stockade.config import Config, ConfigError, ConfigPermissionError, load_config
from stockade.protocol import COMMANDS_BY_NAME, EXIT_CODES, CommandError
from stockade.targets import TargetError, format_target, mapping_note, parse_target

ENV_SOCKET = "STOCKADE_SOCKET"


def command_help(name: str) -> str:
    return COMMANDS_BY_NAME[name].help


def fail(message: str, hint: str | None = None, code: int = 1) -> NoReturn:
    click.echo(f"stockade: {message}" + (f"; {hint}" if hint else ""), err=True)
    sys.exit(code)


@dataclass
class Context:
    config_path: Path | None
    socket_override: Path | None
    verbose: bool
    _config: Config | None = None

    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_path)
            except ConfigPermissionError as exc:  # not bad input: we may not read it
                fail(str(exc), None, 1)
            except ConfigError as exc:
                fail(str(exc), "check it with `stockade check-config`", 2)
        return self._config

    @property
    def socket(self) -> Path:
        if self.socket_override is not None:
            return self.socket_override
        return self.config().controller.socket

    def call(self, command: str, **args: Any) -> Any:
        try:
            return call(self.socket, command, **args)
        except CommandError as exc:
            fail(exc.message, exc.hint, EXIT_CODES.get(exc.kind, 1))


pass_ctx = click.make_pass_decorator(Context)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (stable format).")


def check_target(text: str) -> str:
    """The canonical target, or exit 2; says so when an IPv4-mapped address was unmapped."""
    try:
        canonical = format_target(parse_target(text))
        note = mapping_note(text)
    except TargetError as exc:
        fail(str(exc), None, 2)
    if note is not None:
        click.echo(f"stockade: note: {note}", err=True)
    return canonical


# An optional sign, ASCII digits, an optional fraction: what `--factor 2.5` means.
# float() would also take "٣", "1_0", "nan", "inf" and surrounding whitespace.
_DECIMAL = re.compile(r"[+-]?[0-9]{1,15}(?:\.[0-9]{1,15})?")


class AsciiNumber(click.ParamType[float]):
    """A finite decimal number written in ASCII digits, optionally within [low, high]."""

    name = "number"

    def __init__(self, low: float | None = None, high: float | None = None) -> None:
        self.low = low
        self.high = high

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float):  # a default
            return value
        text = str(value)
        if not text.isascii() or not _DECIMAL.fullmatch(text):
            self.fail(f"{text!r} is not a number (ASCII digits, e.g. 2 or 2.5)", param, ctx)
        number = float(text)
        if not math.isfinite(number):
            self.fail(f"{text!r} is not a finite number", param, ctx)
        if self.low is not None and number < self.low:
            self.fail(f"{text} is below the minimum {self.low:g}", param, ctx)
        if self.high is not None and number > self.high:
            self.fail(f"{text} is above the maximum {self.high:g}", param, ctx)
        return number
