"""Per-key rates from a map file, like HAProxy's map files, reloaded when it changes.

    # key            rate (N/window, or a count per the limit's own window)
    198.18.0.10      1000/min
    partner-acme     50

A key not in the file gets the limit's own rate. The file is checked for a
change at most once a second; a new version that does not parse is refused
with a logged error and the previous one stays in force.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from stockade.proxy.ratelimit_settings import Rate, RateError, parse_rate

log = logging.getLogger("stockade.proxy")

CHECK_INTERVAL = 1.0
MAX_ENTRIES = 1_000_000


class RateMapError(ValueError):
    pass


def parse_rate_map(text: str, default: Rate, where: str) -> dict[str, Rate]:
    rates: dict[str, Rate] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise RateMapError(f"{where}:{number}: expected `KEY RATE`, got {raw.strip()!r}")
        key, value = parts
        try:
            rate = (
                Rate(int(value), default.window, f"{value}/{default.window:g}s")
                if value.isascii() and value.isdigit()  # str.isdigit takes any script's
                else parse_rate(value)
            )
        except RateError as exc:
            raise RateMapError(f"{where}:{number}: {exc}") from None
        if rate.count < 1:
            raise RateMapError(f"{where}:{number}: the rate must be at least 1")
        rates[key] = rate
        if len(rates) > MAX_ENTRIES:
            raise RateMapError(f"{where}: more than {MAX_ENTRIES} entries")
    return rates


class RateMap:
    def __init__(self, path: Path, default: Rate) -> None:
        self.path = path
        self.default = default
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self.rates = self._read()  # a bad file at start is a startup error

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self.path)
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _read(self) -> dict[str, Rate]:
        try:
            stamp = self._stat()
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise RateMapError(f"cannot read rate map {self.path}: {exc}") from None
        rates = parse_rate_map(text, self.default, str(self.path))
        self._stamp = stamp
        return rates

    def rate(self, key: str) -> Rate:
        now = time.monotonic()
        if now - self._checked >= CHECK_INTERVAL:
            self._checked = now
            self._maybe_reload()
        return self.rates.get(key, self.default)

    def _maybe_reload(self) -> None:
        try:
            stamp = self._stat()
        except OSError as exc:
            if self._stamp is not None:
                log.error("rate map %s: %s; keeping the rates loaded before", self.path, exc)
                self._stamp = None
            return
        if stamp == self._stamp:
            return
        try:
            self.rates = self._read()
        except RateMapError as exc:
            log.error("%s; keeping the rates loaded before", exc)
            self._stamp = stamp  # do not retry until the file changes again
            return
        log.info("rate map %s reloaded: %d entries", self.path, len(self.rates))
