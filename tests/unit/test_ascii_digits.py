"""Every parser of user input takes ASCII digits only.

`\\d`, int(), float() and str.isdigit() also take other scripts' digits
(`٣` is 3 to int()), and isdigit() is true for `²`, which int() then refuses
with a bare ValueError. Durations, sizes, rates, rate maps, ports, the Redis
database number, targets, the status page's refresh and the CLI's numbers
must each refuse them with their own error.
"""

from __future__ import annotations

from typing import Any

import click
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade.cli.context import AsciiNumber
from stockade.config import ConfigError, parse_config
from stockade.config_fields import Section
from stockade.durations import DurationError, parse_duration
from stockade.proxy.rate_maps import RateMapError, parse_rate_map
from stockade.proxy.ratelimit_settings import Rate, RateError, parse_rate
from stockade.proxy.status_page import REFRESH, refresh_seconds
from stockade.targets import TargetError, parse_target

# Characters some parser might take for a digit: decimal digits of every script
# (int() reads them), and the other numbers str.isdigit() is true for (², ①).
UNICODE_DIGITS = st.characters(categories=("Nd", "No", "Nl")).filter(
    lambda ch: not ch.isascii() and (ch.isdigit() or ch.isdecimal() or ch.isnumeric())
)
ASCII_NUMBER = st.integers(min_value=1, max_value=999).map(str)


def with_digit(number: str, digit: str, where: int) -> str:
    """`number` with `digit` in place of one of its characters, or added."""
    where %= len(number) + 1
    return number[:where] + digit + number[where + 1 :]


def test_the_strategy_finds_the_dangerous_characters() -> None:
    # int() reads this one; isdigit() is true for the other, which int() refuses
    assert int("٣") == 3 and "²".isdigit()


@given(ASCII_NUMBER, UNICODE_DIGITS, st.integers(0, 3), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_durations(number: str, digit: str, where: int, unit: str) -> None:
    assert parse_duration(number + unit) > 0  # the ASCII form is fine
    with pytest.raises(DurationError, match="invalid duration"):
        parse_duration(with_digit(number, digit, where) + unit)


@given(UNICODE_DIGITS)
def test_a_duration_of_only_a_foreign_digit(digit: str) -> None:
    with pytest.raises(DurationError):
        parse_duration(f"{digit}s")


def test_a_duration_number_too_long_for_int_is_a_duration_error() -> None:
    with pytest.raises(DurationError, match="invalid duration"):
        parse_duration("9" * 5000 + "s")  # int() would raise a bare ValueError


@given(ASCII_NUMBER, UNICODE_DIGITS, st.integers(0, 3), st.sampled_from(["", "KiB", "MiB"]))
def test_sizes(number: str, digit: str, where: int, unit: str) -> None:
    assert Section("proxy", {"max": number + unit}).size("max", 0) > 0
    with pytest.raises(ConfigError, match=r"proxy\.max: invalid size"):
        Section("proxy", {"max": with_digit(number, digit, where) + unit}).size("max", 0)


def test_a_size_unit_with_a_kelvin_sign_is_refused() -> None:
    # case-insensitive Unicode matching would take "\u212a" (Kelvin) for "k"
    with pytest.raises(ConfigError, match="invalid size"):
        Section("proxy", {"max": "10\u212aiB"}).size("max", 0)


@given(ASCII_NUMBER, UNICODE_DIGITS, st.integers(0, 3), st.sampled_from(["s", "min", "10s"]))
def test_rates(number: str, digit: str, where: int, window: str) -> None:
    assert parse_rate(f"{number}/{window}").count == int(number)
    with pytest.raises(RateError, match="invalid rate"):
        parse_rate(f"{with_digit(number, digit, where)}/{window}")


@given(ASCII_NUMBER, UNICODE_DIGITS)
def test_a_rate_window_with_a_foreign_digit(number: str, digit: str) -> None:
    with pytest.raises(RateError, match="invalid rate"):
        parse_rate(f"{number}/{digit}s")


@given(ASCII_NUMBER, UNICODE_DIGITS, st.integers(0, 3))
def test_rate_maps(number: str, digit: str, where: int) -> None:
    default = Rate(10, 60.0, "10/min")
    assert parse_rate_map(f"key {number}\n", default, "map")["key"].count == int(number)
    with pytest.raises(RateMapError, match="map:1"):
        parse_rate_map(f"key {with_digit(number, digit, where)}\n", default, "map")


def servers(address: str) -> dict[str, Any]:
    return {"proxy": {"pools": {"api": {"servers": [address]}}}}


@given(UNICODE_DIGITS, st.integers(0, 4))
def test_upstream_ports(digit: str, where: int) -> None:
    parse_config(servers("198.18.1.10:8080"))
    with pytest.raises(ConfigError, match="is not host:port"):
        parse_config(servers("198.18.1.10:" + with_digit("8080", digit, where)))


@given(UNICODE_DIGITS)
def test_redis_database_number(digit: str) -> None:
    auth = {"key_file": "/etc/stockade/cluster.key"}
    with pytest.raises(ConfigError, match=r"cluster\.url"):
        parse_config(
            {
                "cluster": {
                    "backend": "redis",
                    "url": f"redis://198.18.2.1:6379/{digit}",
                    "auth": auth,
                }
            }
        )


@given(
    UNICODE_DIGITS, st.sampled_from(["198.18.0.{}", "198.18.{}.7", "198.18.0.0/2{}", "fd00::{}"])
)
def test_targets(digit: str, form: str) -> None:
    parse_target(form.format("4"))
    with pytest.raises(TargetError, match="invalid target"):
        parse_target(form.format(digit))


@given(UNICODE_DIGITS)
def test_management_networks_in_the_config(digit: str) -> None:
    with pytest.raises(ConfigError, match=r"xdp\.management_networks"):
        parse_config({"xdp": {"management_networks": [f"198.18.20{digit}.0/24"]}})


@given(UNICODE_DIGITS, st.integers(0, 2))
def test_status_page_refresh(digit: str, where: int) -> None:
    assert refresh_seconds("refresh=15") == 15
    assert refresh_seconds("refresh=" + with_digit("15", digit, where)) == REFRESH


def test_status_page_refresh_too_long_for_int() -> None:
    assert refresh_seconds("refresh=" + "9" * 5000) == REFRESH


@given(UNICODE_DIGITS, st.integers(0, 3))
def test_cli_numbers(digit: str, where: int) -> None:
    number = AsciiNumber(0.1, 3600)
    assert number.convert("2.5", None, None) == 2.5
    with pytest.raises(click.BadParameter, match="not a number"):
        number.convert(with_digit("2.5", digit, where), None, None)


@pytest.mark.parametrize("text", ["nan", "inf", "1_0", " 2", "2 ", "0x10", "1e3", "", "+"])
def test_cli_numbers_are_plain_decimals(text: str) -> None:
    with pytest.raises(click.BadParameter):
        AsciiNumber().convert(text, None, None)


def test_cli_number_bounds() -> None:
    with pytest.raises(click.BadParameter, match=r"below the minimum 0\.1"):
        AsciiNumber(0.1, 3600).convert("0.05", None, None)
    with pytest.raises(click.BadParameter, match="above the maximum 3600"):
        AsciiNumber(0.1, 3600).convert("3601", None, None)
