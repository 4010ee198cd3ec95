"""Reading one TOML table into typed values, with errors that name the key.

Shared by every part of the configuration (controller, xdp, proxy, ...).
Unknown keys are refused with a did-you-mean.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from stockade.durations import DurationError, parse_duration
from stockade.targets import Network, TargetError, parse_target

# ASCII only (re.ASCII): Unicode digits, and a Kelvin sign matching "K" when case is ignored
_SIZE = re.compile(r"([0-9]{1,19})\s*(B|KiB|MiB|GiB|KB|MB|GB)?", re.IGNORECASE | re.ASCII)
_SIZE_UNITS = {
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
}


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key."""


class Section:
    """Reads one table, remembering which keys were used."""

    def __init__(self, name: str, table: Any) -> None:
        if not isinstance(table, dict):
            raise ConfigError(f"[{name}] must be a table")
        self.name = name
        self.table: dict[str, Any] = table
        self.known: set[str] = set()

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def get(self, key: str, kind: type | tuple[type, ...], default: Any) -> Any:
        self.known.add(key)
        if key not in self.table:
            return default
        value = self.table[key]
        # bool is an int in Python; never accept it where a number is meant
        if isinstance(value, bool) and kind is not bool:
            raise ConfigError(f"{self.key(key)}: expected {kind_name(kind)}, got a boolean")
        if not isinstance(value, kind):
            raise ConfigError(
                f"{self.key(key)}: expected {kind_name(kind)}, got {type(value).__name__}"
            )
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value: int = self.get(key, int, default)
        if not low <= value <= high:
            raise ConfigError(f"{self.key(key)}: {value} is out of range ({low}..{high})")
        return value

    def duration(self, key: str, default: float, *, allow_zero: bool = False) -> float:
        value = self.get(key, str, None)
        if value is None:
            return default
        if allow_zero and value.strip() in ("0", "0s"):
            return 0.0
        try:
            return float(parse_duration(value))
        except DurationError as exc:
            raise ConfigError(f"{self.key(key)}: {exc}") from None

    def path(self, key: str, default: Path) -> Path:
        value = self.get(key, str, None)
        if value is None:
            return default
        if not value.startswith("/"):
            raise ConfigError(f"{self.key(key)}: must be an absolute path, got {value!r}")
        return Path(value)

    def finish(self) -> None:
        unknown = sorted(set(self.table) - self.known)
        if unknown:
            raise ConfigError(unknown_message(self.name + ".", unknown[0], self.known))

    def size(self, key: str, default: int, low: int = 0, high: int = 1 << 50) -> int:
        """Bytes, from an integer or a string such as "512KiB", "10MiB", "1GiB"."""
        value = self.get(key, (int, str), None)
        if value is None:
            return default
        if isinstance(value, int):
            size = value
        else:
            match = _SIZE.fullmatch(value.strip()) if value.isascii() else None
            if match is None:
                raise ConfigError(
                    f"{self.key(key)}: invalid size {value!r}; use bytes or e.g. 512KiB, 10MiB"
                )
            size = int(match.group(1)) * _SIZE_UNITS[(match.group(2) or "b").lower()]
        if not low <= size <= high:
            raise ConfigError(f"{self.key(key)}: {size} bytes is out of range ({low}..{high})")
        return size

    def networks(self, key: str) -> tuple[Network, ...]:
        out = []
        for text in self.get(key, list, []):
            if not isinstance(text, str):
                raise ConfigError(f"{self.key(key)}: {text!r} is not a string")
            try:
                out.append(parse_target(text))
            except TargetError as exc:
                raise ConfigError(f"{self.key(key)}: {exc}") from None
        return tuple(out)

    def subsection(self, key: str) -> Section:
        """A nested table, as its own Section (an absent key gives an empty one)."""
        return Section(self.key(key), self.get(key, dict, {}))


def kind_name(kind: type | tuple[type, ...]) -> str:
    names = {
        str: "a string",
        int: "an integer",
        bool: "true or false",
        list: "a list",
        dict: "a table",
        float: "a number",
    }
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def unknown_message(prefix: str, key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else ""
    return f"unknown key {prefix}{key}{hint}"
