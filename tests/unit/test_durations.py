"""Durations as operators write them."""

from __future__ import annotations

import pytest

from stockade.durations import DurationError, format_duration, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("15m", 900),
        ("1h", 3600),
        ("7d", 7 * 86400),
        ("2w", 14 * 86400),
        ("1h30m", 5400),
        ("1d2h3m4s", 86400 + 7200 + 180 + 4),
        ("1H", 3600),
        (" 15m ", 900),
    ],
)
def test_valid(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["0s", "0h0m", "-1s", "-1m", "1x", "", " ", "15", "m", "1.5h", "1 h", "1h 30m", "h1"]
)
def test_invalid(text: str) -> None:
    with pytest.raises(DurationError) as info:
        parse_duration(text)
    assert repr(text) in str(info.value)


def test_zero_says_it_must_be_positive() -> None:
    with pytest.raises(DurationError, match="longer than 0s"):
        parse_duration("0s")


def test_unknown_unit_shows_examples() -> None:
    with pytest.raises(DurationError, match=r"e\.g\. 90s, 15m, 1h, 7d"):
        parse_duration("5x")


def test_maximum() -> None:
    assert parse_duration("7d", maximum=7 * 86400) == 7 * 86400
    with pytest.raises(DurationError, match="at most 7d"):
        parse_duration("7d1s", maximum=7 * 86400)


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0s"), (59, "59s"), (90, "1m30s"), (3725, "1h2m5s"), (86400, "1d")]
)
def test_format(seconds: int, text: str) -> None:
    assert format_duration(seconds) == text


def test_format_round_trips() -> None:
    for seconds in (1, 61, 3599, 90061, 10 * 86400 + 5):
        assert parse_duration(format_duration(seconds)) == seconds


def test_format_clamps_negative_to_zero() -> None:
    assert format_duration(-5) == "0s"


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("1s500ms", 1.5), ("1000ms", 1.0)])
def test_milliseconds_for_short_intervals(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


def test_zero_milliseconds_is_refused() -> None:
    with pytest.raises(DurationError, match="longer than 0s"):
        parse_duration("0ms")
