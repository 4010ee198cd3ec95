"""Targets: addresses and CIDR prefixes, v4 and v6, as operators type them."""

from __future__ import annotations

import ipaddress

import pytest

from stockade.targets import TargetError, covers, format_target, is_exact, parse_target


@pytest.mark.parametrize(
    ("text", "canonical"),
    [
        ("198.18.0.7", "198.18.0.7"),
        ("198.18.0.7/32", "198.18.0.7"),
        ("198.18.0.0/24", "198.18.0.0/24"),
        ("0.0.0.0/0", "0.0.0.0/0"),
        ("fd00::7", "fd00::7"),
        ("fd00::7/128", "fd00::7"),
        ("fd00:0:0:0::7", "fd00::7"),
        ("FD00::/64", "fd00::/64"),
        ("fd00:18::/48", "fd00:18::/48"),
    ],
)
def test_parse_and_format_canonical(text: str, canonical: str) -> None:
    assert format_target(parse_target(text)) == canonical


def test_bare_address_and_full_length_prefix_are_the_same_target() -> None:
    assert parse_target("198.18.0.7") == parse_target("198.18.0.7/32")
    assert parse_target("fd00::7") == parse_target("fd00::7/128")
    assert is_exact(parse_target("198.18.0.7"))
    assert not is_exact(parse_target("198.18.0.0/31"))
    assert not is_exact(parse_target("fd00::/127"))


@pytest.mark.parametrize(
    ("text", "meant"),
    [
        ("198.18.0.7/24", "198.18.0.0/24"),
        ("198.18.1.1/16", "198.18.0.0/16"),
        ("fd00::1/64", "fd00::/64"),
        ("fd00:18::5/48", "fd00:18::/48"),
    ],
)
def test_host_bits_set_names_the_meant_prefix(text: str, meant: str) -> None:
    with pytest.raises(TargetError) as info:
        parse_target(text)
    message = str(info.value)
    assert "host bits" in message
    assert f"did you mean {meant}?" in message
    assert text in message


@pytest.mark.parametrize(
    "text",
    [
        "banana",
        "198.18.0",
        "198.18.0.256",
        "198.18.0.7/33",
        "198.18.0.7/-1",
        "198.18.0.7/",
        "198.18.0.7/abc",
        "fd00::/129",
        "fd00:::1",
        "gggg::1",
        "198.18.0.7:80",
        "http://198.18.0.7",
        "198.18.0.7,198.18.0.8",
    ],
)
def test_garbage_is_refused_with_an_example(text: str) -> None:
    with pytest.raises(TargetError) as info:
        parse_target(text)
    assert "invalid" in str(info.value)
    assert "198.18.0.7" in str(info.value) or "host bits" in str(info.value)


@pytest.mark.parametrize("text", [" 198.18.0.7", "198.18.0.7 ", "198.18.0.7 /32", "198.18.\t0.7"])
def test_whitespace_is_refused(text: str) -> None:
    with pytest.raises(TargetError, match="whitespace"):
        parse_target(text)


@pytest.mark.parametrize("text", ["", "   ", "\n"])
def test_empty_is_refused(text: str) -> None:
    with pytest.raises(TargetError, match="empty target"):
        parse_target(text)


def test_covers() -> None:
    net = parse_target
    assert covers(net("198.18.0.0/24"), net("198.18.0.7"))
    assert covers(net("198.18.0.0/24"), net("198.18.0.128/25"))
    assert covers(net("198.18.0.0/24"), net("198.18.0.0/24"))
    assert not covers(net("198.18.0.0/25"), net("198.18.0.0/24"))
    assert not covers(net("198.18.0.0/24"), net("198.18.1.7"))
    assert covers(net("fd00::/64"), net("fd00::7"))
    assert not covers(net("fd00::/64"), net("fd00:0:0:1::7"))


def test_covers_never_crosses_families() -> None:
    v4_all = parse_target("0.0.0.0/0")
    v6_all = parse_target("::/0")
    mapped = ipaddress.ip_network("::ffff:198.18.0.7/128")
    assert not covers(v4_all, parse_target("fd00::7"))
    assert not covers(v6_all, parse_target("198.18.0.7"))
    assert not covers(v4_all, mapped)
