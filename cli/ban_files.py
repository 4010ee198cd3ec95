"""Files of bans for `stockade ban --file` and `stockade unban --file`.

One target a line, optionally followed by a TTL and a reason:

    198.18.0.7
    198.18.0.8   1h   scanner from the 03:00 report
    198.18.4.0/24  -  botnet range     # "-": the --ttl default (or permanent)
    {"target": "fd00::7", "ttl": "7d", "reason": "json lines work too"}

Blank lines and lines starting with `#` are skipped. `unban --file` reads the
same format and uses only the targets, so a file that banned can unban. The
whole file is checked here before anything is sent: one bad line refuses it.
"""

from __future__ import annotations

import functools
import json
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from stockade.controller.service import MAX_REASON, MAX_TTL
from stockade.durations import DurationError, parse_duration
from stockade.protocol import MAX_BATCH
from stockade.targets import TargetError, format_target, mapping_note, parse_target

MAX_LINE_BYTES = 4096
DEFAULT_TTL = "-"


@dataclass
class BanFile:
    name: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)  # the line of each entry
    refused: list[tuple[int, str]] = field(default_factory=list)  # (line, why)
    mapped: list[tuple[int, str]] = field(default_factory=list)  # (line, note)
    read: int = 0  # lines with a target, refused ones included

    def line_of(self, entry: int) -> int | None:
        """The file line of a batch entry (numbered from 1)."""
        return self.lines[entry - 1] if 1 <= entry <= len(self.lines) else None


@functools.lru_cache(maxsize=1024)  # a file repeats a few reasons and TTLs: check each once
def _reason_error(reason: str) -> str | None:
    if len(reason) > MAX_REASON:
        return f"reason is {len(reason)} characters; at most {MAX_REASON}"
    if any(unicodedata.category(ch).startswith("C") for ch in reason):
        return "reason must not contain control characters"
    return None


@functools.lru_cache(maxsize=1024)
def _duration_error(ttl: str) -> str | None:
    try:
        parse_duration(ttl, maximum=MAX_TTL)
    except DurationError as exc:
        return str(exc)
    return None


def _fields(text: str) -> tuple[Any, Any, Any]:
    """target, ttl, reason of one line (None where absent); ValueError when malformed."""
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            raise ValueError("not a valid JSON object") from None
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        unknown = sorted(set(data) - {"target", "ttl", "reason"})
        if unknown:
            raise ValueError(f"unknown field {unknown[0][:40]!r} (target, ttl, reason)")
        for key in ("target", "ttl", "reason"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ValueError(f"{key} must be a string")
        return data.get("target"), data.get("ttl"), data.get("reason")
    parts = text.split(None, 2)
    target = parts[0]
    ttl = parts[1] if len(parts) > 1 else None
    reason = parts[2].strip() if len(parts) > 2 else None
    return target, None if ttl == DEFAULT_TTL else ttl, reason


def parse_lines(
    name: str,
    lines: Iterable[bytes],
    *,
    ttl: str | None = None,
    reason: str | None = None,
    targets_only: bool = False,
) -> BanFile:
    """Every line checked: entries for the batch, and what was refused and why.

    `ttl` and `reason` are the defaults for lines that give none; with
    `targets_only` (unban) only the target of each line is taken.
    """
    out = BanFile(name)
    for number, raw in enumerate(lines, 1):
        if len(raw.rstrip(b"\r\n")) > MAX_LINE_BYTES:
            out.read += 1
            out.refused.append((number, f"line longer than {MAX_LINE_BYTES} bytes"))
            continue
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            out.read += 1
            out.refused.append((number, "not UTF-8"))
            continue
        if not text or text.startswith("#"):
            continue
        out.read += 1
        if out.read > MAX_BATCH:
            out.refused.append((number, f"more than {MAX_BATCH} targets in one file; split it"))
            break
        error = _entry(out, number, text, ttl, reason, targets_only)
        if error is not None:
            out.refused.append((number, error))
    return out


def _entry(
    out: BanFile,
    number: int,
    text: str,
    default_ttl: str | None,
    default_reason: str | None,
    targets_only: bool,
) -> str | None:
    """Add the line's entry to `out`; or say why it is refused."""
    try:
        target, ttl, reason = _fields(text)
    except ValueError as exc:
        return str(exc)
    if not isinstance(target, str):
        return "no target"
    try:
        net = parse_target(target)
    except TargetError as exc:
        return str(exc)
    if net.version == 4 and ":" in target:  # IPv4-mapped: say what it is taken as
        note = mapping_note(target)
        if note is not None:
            out.mapped.append((number, note))
    entry: dict[str, Any] = {"target": format_target(net)}
    if not targets_only:
        ttl = ttl if ttl is not None else default_ttl
        reason = reason if reason is not None else default_reason
        if ttl is not None:
            error = _duration_error(ttl)
            if error is not None:
                return error
            entry["ttl"] = ttl
        if reason is not None:
            error = _reason_error(reason)
            if error is not None:
                return error
            entry["reason"] = reason
    out.entries.append(entry)
    out.lines.append(number)
    return None


def read_lines(stream: IO[bytes]) -> Iterable[bytes]:
    """Lines of a file or stdin, an overlong one cut short (and then refused): memory
    stays bounded whatever the input."""
    cut = MAX_LINE_BYTES + 2  # room for the line, its CR LF, and one byte to tell
    while True:
        line = stream.readline(cut)
        if not line:
            return
        if len(line) == cut and not line.endswith(b"\n"):
            while True:  # skip the rest of an overlong line
                rest = stream.readline(MAX_LINE_BYTES)
                if not rest or rest.endswith(b"\n"):
                    break
        yield line
