"""Durations as operators write them: `90s`, `15m`, `1h`, `7d`, `1h30m`, `250ms`.

ASCII digits only: `\\d` and int() also take other scripts' digits (`٣s`). A
number has at most 15 digits (far beyond any limit here, and below the
4300-digit ceiling int() raises a bare ValueError at).
"""

from __future__ import annotations

import re

UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"([0-9]{1,15})(ms|[smhdw])")
_WHOLE = re.compile(r"(?:[0-9]{1,15}(?:ms|[smhdw]))+")


class DurationError(ValueError):
    pass


def parse_duration(text: str, *, maximum: int | None = None) -> float:
    """Seconds in a duration such as `90s`, `1h30m` or `250ms`; it must be > 0."""
    raw = text.strip().lower()
    if not raw.isascii() or not _WHOLE.fullmatch(raw):
        raise DurationError(
            f"invalid duration {text!r}: use a number and a unit (ms, s, m, h, d, w), "
            "e.g. 90s, 15m, 1h, 7d"
        )
    seconds = float(sum(int(n) * UNITS[unit] for n, unit in _PART.findall(raw)))
    if seconds <= 0:
        raise DurationError(f"invalid duration {text!r}: must be longer than 0s")
    if maximum is not None and seconds > maximum:
        raise DurationError(
            f"invalid duration {text!r}: at most {format_duration(maximum)} is allowed"
        )
    return seconds


def format_duration(seconds: float) -> str:
    """Short human form: 3725 -> `1h2m5s`."""
    left = max(0, round(seconds))
    if left == 0:
        return "0s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, left = divmod(left, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
