"""Shared pieces of the CLI: the context object, errors and output flags."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import click

from stockade.cli.client import call
from stockade.config import Config, ConfigError, load_config
from stockade.protocol import COMMANDS_BY_NAME, EXIT_CODES, CommandError
from stockade.targets import TargetError, format_target, parse_target

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
    try:
        return format_target(parse_target(text))
    except TargetError as exc:
        fail(str(exc), None, 2)
