"""Targets that mean something else than they say: zone ids, IPv4-mapped IPv6, /0.

Checked here on the parser, the config and the ban store; through the
controller and the kernel in tests/cli/test_cli_targets.py and
tests/bpf/test_bpf_batch.py.
"""

from __future__ import annotations

import ipaddress
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade.config import ConfigError, parse_config
from stockade.controller.store import BanStore
from stockade.targets import (
    Network,
    PrefixFloor,
    TargetError,
    format_target,
    is_exact,
    mapping_note,
    parse_target,
    unmap,
)

V4 = st.ip_addresses(v=4)
ZONES = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="%/"),
    min_size=1,
    max_size=15,
)


@given(st.ip_addresses(v=6), ZONES, st.sampled_from(["", "/128", "/64"]))
def test_a_zone_id_is_refused(address: ipaddress.IPv6Address, zone: str, length: str) -> None:
    with pytest.raises(TargetError, match="zone id") as info:
        parse_target(f"{address}%{zone}{length}")
    assert f"e.g. {address}{length}" in str(info.value)  # says what to give instead


@given(V4)
def test_a_mapped_address_is_the_ipv4_address(address: ipaddress.IPv4Address) -> None:
    net = parse_target(f"::ffff:{address}")
    assert net == ipaddress.IPv4Network(address)
    assert format_target(net) == str(address)
    # ... and the hex spelling too
    packed = int(address)
    assert parse_target(f"::ffff:{packed >> 16:x}:{packed & 0xFFFF:x}") == net


@given(V4, st.integers(0, 32))
def test_a_mapped_prefix_is_the_ipv4_prefix(address: ipaddress.IPv4Address, length: int) -> None:
    v4 = ipaddress.IPv4Network((address, length), strict=False)
    mapped = f"::ffff:{v4.network_address}/{96 + length}"
    assert parse_target(mapped) == v4
    note = mapping_note(mapped)
    assert note is not None and f"enforced as {format_target(v4)}" in note


def test_the_issue_examples() -> None:
    assert format_target(parse_target("::ffff:198.18.0.11")) == "198.18.0.11"
    assert format_target(parse_target("::ffff:198.18.0.0/112")) == "198.18.0.0/16"
    with pytest.raises(TargetError, match="zone id"):
        parse_target("fd00::12%x")


def test_a_mapped_prefix_with_host_bits_names_the_ipv4_prefix_meant() -> None:
    with pytest.raises(TargetError, match=r"did you mean 198\.18\.0\.0/16\?"):
        parse_target("::ffff:198.18.0.1/112")


@pytest.mark.parametrize("text", ["fd00::7", "::1", "2001:db8::/32", "::/0", "::fffe:0:0/95"])
def test_other_ipv6_stays_ipv6(text: str) -> None:
    assert parse_target(text).version == 6
    assert mapping_note(text) is None


@pytest.mark.parametrize("text", ["198.18.0.7", "198.18.0.0/24", "fd00::/64"])
def test_no_note_for_what_is_taken_as_written(text: str) -> None:
    assert mapping_note(text) is None


def slow_parse(text: str) -> Network | None:
    """What ipaddress alone makes of a target (mapped unwrapped), None where it refuses."""
    try:
        return unmap(ipaddress.ip_network(text, strict=True))
    except ValueError:
        return None


SPELLINGS = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=6).map(lambda a: a.exploded),
    st.ip_addresses(v=6).map(lambda a: str(a).upper()),
    st.builds(
        lambda a, n: f"{a}/{n}", st.ip_addresses(v=4), st.sampled_from(["0", "8", "024", "32"])
    ),
    st.builds(lambda a, n: f"{a}/{n}", st.ip_addresses(v=6), st.sampled_from(["0", "64", "128"])),
    st.text(st.sampled_from("0123456789abcdefABCDEF.:/x"), max_size=45),
)


@given(SPELLINGS)
def test_the_fast_parser_agrees_with_ipaddress(text: str) -> None:
    expected = slow_parse(text)
    try:
        net = parse_target(text)
    except TargetError:
        assert expected is None, text
        return
    assert net == expected, text
    # and the canonical text is ipaddress's, inet_ntop or not
    canonical = str(net.network_address) if is_exact(net) else str(net)
    assert format_target(net) == canonical


@given(st.integers(0, 32), st.integers(0, 32))
def test_the_v4_floor(minimum: int, length: int) -> None:
    floor = PrefixFloor(v4=minimum)
    net = ipaddress.IPv4Network(("198.18.0.0", length), strict=False)
    assert floor.too_broad(net) == (length < minimum)


@given(st.integers(0, 128), st.integers(0, 128))
def test_the_v6_floor(minimum: int, length: int) -> None:
    floor = PrefixFloor(v6=minimum)
    net = ipaddress.IPv6Network(("fd00::", length), strict=False)
    assert floor.too_broad(net) == (length < minimum)


def test_default_floor_and_its_message() -> None:
    floor = PrefixFloor()
    assert (floor.v4, floor.v6) == (8, 16)
    assert floor.too_broad(parse_target("0.0.0.0/0")) and floor.too_broad(parse_target("::/0"))
    assert not floor.too_broad(parse_target("10.0.0.0/8"))
    assert not floor.too_broad(parse_target("fd00::/16"))
    message = floor.refusal(parse_target("0.0.0.0/0"), "ban")
    assert message == (
        "refusing to ban 0.0.0.0/0: a /0 covers 4,294,967,296 addresses, "
        "broader than the minimum /8 (xdp.min_prefix_v4)"
    )
    assert "(xdp.min_prefix_v6)" in floor.refusal(parse_target("::/0"), "allow")


# -- the config ------------------------------------------------------------------------
def test_config_floor_keys() -> None:
    assert parse_config({}).xdp.prefix_floor == PrefixFloor(8, 16)
    xdp = parse_config({"xdp": {"min_prefix_v4": 16, "min_prefix_v6": 32}}).xdp
    assert xdp.prefix_floor == PrefixFloor(16, 32)
    with pytest.raises(ConfigError, match="out of range"):
        parse_config({"xdp": {"min_prefix_v4": 33}})


@pytest.mark.parametrize("network", ["0.0.0.0/0", "10.0.0.0/7", "::/0", "fd00::/15"])
def test_a_management_network_broader_than_the_floor_is_refused(network: str) -> None:
    with pytest.raises(ConfigError, match=r"xdp\.management_networks: refusing to allow"):
        parse_config({"xdp": {"management_networks": [network]}})
    lowered = {"management_networks": [network], "min_prefix_v4": 0, "min_prefix_v6": 0}
    assert parse_config({"xdp": lowered}).xdp.management_networks == (parse_target(network),)


def test_a_mapped_management_network_is_the_ipv4_one() -> None:
    config = parse_config({"xdp": {"management_networks": ["::ffff:198.18.200.0/120"]}})
    assert config.xdp.management_networks == (parse_target("198.18.200.0/24"),)


# -- stores written before: made canonical when opened ------------------------------
def test_a_store_with_legacy_targets_is_made_canonical(tmp_path: Path) -> None:
    path = tmp_path / "bans.db"
    BanStore(path).close()
    db = sqlite3.connect(path)
    rows = [
        ("fd00::12%x", "zone id"),
        ("fd00:5::%eth0/64", "zone id on a prefix"),
        ("::ffff:c612:b", "mapped"),
        ("::ffff:c612:0/112", "mapped prefix"),
        ("::ffff:c612:7", "mapped, also stored canonical"),
        ("198.18.0.7", "canonical"),
    ]
    for target, reason in rows:
        db.execute(
            "INSERT INTO bans (target, reason, source, created, expires) "
            "VALUES (?, ?, 'cli', 1, NULL)",
            (target, reason),
        )
        db.execute(
            "INSERT INTO ban_events (target, at, action, source, reason) "
            "VALUES (?, 1, 'ban', 'cli', ?)",
            (target, reason),
        )
    db.execute(
        "INSERT INTO allows (target, reason, created) VALUES ('::ffff:c612:900/120', 'a', 1)"
    )
    db.commit()
    db.close()

    store = BanStore(path)
    try:
        bans = {format_target(b.target): b.reason for b in store.bans()}
        assert bans == {
            "fd00::12": "zone id",
            "fd00:5::/64": "zone id on a prefix",
            "198.18.0.11": "mapped",
            "198.18.0.0/16": "mapped prefix",
            "198.18.0.7": "canonical",  # the canonical row kept, the legacy one gone
        }
        assert [format_target(a.target) for a in store.allows()] == ["198.18.9.0/24"]
        assert [e.reason for e in store.events(parse_target("198.18.0.11"))] == ["mapped"]
        assert store.delete_ban(parse_target("fd00::12"))  # an unban of the bare address works
    finally:
        store.close()
