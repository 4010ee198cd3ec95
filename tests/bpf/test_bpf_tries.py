"""Empty tries are skipped, so their counts in `config` must never lag.

The program skips an LPM trie whose count in the config map is 0 (an empty
prefix table then costs nothing). That is only safe while BpfMaps keeps every
count at or above the real number of entries, through every put and delete,
and raises it before an entry can be looked up.
"""

from __future__ import annotations

import ipaddress

import pytest
from xdp_harness import MAP_SIZE, XDP_DROP, XDP_PASS, Xdp

from stockade.controller import layout
from stockade.controller.maps import MapFullError
from stockade.lab.packets import tcp4, tcp6
from stockade.targets import parse_target

pytestmark = pytest.mark.kernel

PASS, DROP = XDP_PASS, XDP_DROP
V4, V6 = "198.18.0.7", "fd00:18::7"

# config field that bounds each trie
TRIE_COUNTS = {
    "ban_prefix_v4": "ban_prefix_v4_count",
    "ban_prefix_v6": "ban_prefix_v6_count",
    "allow_v4": "allow_v4_count",
    "allow_v6": "allow_v6_count",
}


def assert_counts_cover_entries(xdp: Xdp) -> None:
    config = xdp.config()
    for table, field in TRIE_COUNTS.items():
        count, entries = getattr(config, field), xdp.entries(table)
        assert count >= entries, f"config.{field} = {count} < {entries} entries in {table}"


def frame(source: str) -> bytes:
    return tcp4(source) if ipaddress.ip_address(source).version == 4 else tcp6(source)


# (operation, target) steps, then a source and its expected verdict after the step
STEPS = [
    ("put_ban", "198.18.0.0/24", V4, DROP),
    ("put_ban", "198.18.0.0/24", V4, DROP),  # update of the same prefix
    ("put_ban", "198.18.0.7", V4, DROP),  # exact: a hash map, not a trie
    ("put_ban", "198.18.0.0/16", V4, DROP),  # wider prefix around the /24
    ("delete_ban", "198.18.0.0/24", V4, DROP),  # the /16 still covers it
    ("delete_ban", "198.18.0.7", V4, DROP),
    ("delete_ban", "198.18.9.0/24", V4, DROP),  # not there
    ("put_ban", "fd00:18::/64", V6, DROP),
    ("put_allow", "fd00:18::/48", V6, PASS),
    ("put_allow", "198.18.0.0/24", V4, PASS),
    ("delete_allow", "198.18.0.0/24", V4, DROP),
    ("delete_allow", "fd00:18::/48", V6, DROP),
    ("delete_ban", "fd00:18::/64", V6, PASS),
    ("delete_ban", "198.18.0.0/16", V4, PASS),
]


def test_counts_cover_entries_through_put_and_delete(xdp: Xdp) -> None:
    assert_counts_cover_entries(xdp)
    for op, target, source, verdict in STEPS:
        net = parse_target(target)
        if op == "put_ban":
            xdp.maps.put_ban(net, 0)
        else:
            getattr(xdp.maps, op)(net)
        assert_counts_cover_entries(xdp)
        assert xdp.run(frame(source)) == verdict, f"after {op} {target}"

    # everything removed: the counts are back to 0, so the tries are skipped again
    config = xdp.config()
    assert [getattr(config, field) for field in TRIE_COUNTS.values()] == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("wide", "narrow", "source"),
    [("198.18.0.0/16", "198.18.0.0/24", V4), ("fd00:18::/48", "fd00:18::/64", V6)],
)
def test_nested_prefix_ban_outlives_the_wider_one(
    xdp: Xdp, wide: str, narrow: str, source: str
) -> None:
    xdp.maps.put_ban(parse_target(wide), 0)
    xdp.maps.put_ban(parse_target(narrow), 0)
    assert_counts_cover_entries(xdp)

    xdp.maps.delete_ban(parse_target(wide))

    assert_counts_cover_entries(xdp)
    assert xdp.run(frame(source)) == DROP, f"{narrow} is still banned"


@pytest.mark.parametrize(
    ("wide", "narrow", "source"),
    [("198.18.0.0/16", "198.18.0.0/24", V4), ("fd00:18::/48", "fd00:18::/64", V6)],
)
def test_nested_prefix_allow_outlives_the_wider_one(
    xdp: Xdp, wide: str, narrow: str, source: str
) -> None:
    xdp.maps.put_ban(parse_target(source), 0)
    xdp.maps.put_allow(parse_target(wide))
    xdp.maps.put_allow(parse_target(narrow))
    assert_counts_cover_entries(xdp)

    xdp.maps.delete_allow(parse_target(wide))

    assert_counts_cover_entries(xdp)
    assert parse_target(narrow) in xdp.maps.allows()
    assert xdp.run(frame(source)) == PASS, f"{narrow} is still allowed"


@pytest.mark.parametrize(("prefix", "source"), [("198.18.0.0/24", V4), ("fd00:18::/64", V6)])
def test_prefix_is_honoured_right_after_insertion(xdp: Xdp, prefix: str, source: str) -> None:
    assert xdp.run(frame(source)) == PASS  # tries empty and skipped

    xdp.maps.put_ban(parse_target(prefix), 0)
    assert xdp.run(frame(source)) == DROP

    xdp.maps.put_allow(parse_target(prefix))
    assert xdp.run(frame(source)) == PASS
    assert xdp.counters()["allow"].packets == 1

    xdp.maps.delete_allow(parse_target(prefix))
    xdp.maps.delete_ban(parse_target(prefix))
    assert xdp.run(frame(source)) == PASS
    assert xdp.counters()["drop_ban"].packets == 1


def test_a_trie_counted_as_empty_is_skipped(xdp: Xdp) -> None:
    """Why the counts matter: an entry the count does not cover is not seen."""
    key = layout.LpmV4Key(prefixlen=24, addr=(198, 18, 0, 0))
    xdp.table("ban_prefix_v4")[key] = layout.BanValue(expires_ns=0)  # behind BpfMaps' back
    assert xdp.config().ban_prefix_v4_count == 0

    assert xdp.run(tcp4(V4)) == PASS

    xdp.maps.put_ban(parse_target("198.18.5.0/24"), 0)  # count 1: the trie is searched
    assert xdp.run(tcp4(V4)) == DROP


def test_full_trie_keeps_its_count(xdp: Xdp) -> None:
    # MAP_SIZE distinct /28s inside 198.18.0.0/15 (8192 of them)
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    for i in range(MAP_SIZE):
        xdp.maps.put_ban(ipaddress.IPv4Network((base + 16 * i, 28)), 0)

    with pytest.raises(MapFullError, match="ban_prefix_v4"):
        xdp.maps.put_ban(ipaddress.IPv4Network((base + 16 * MAP_SIZE, 28)), 0)

    assert xdp.entries("ban_prefix_v4") == MAP_SIZE
    assert xdp.config().ban_prefix_v4_count == MAP_SIZE
    assert xdp.run(tcp4(V4)) == DROP
