"""BanService on DryRunMaps and a FakeClock: validate, then store, then maps."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from stockade.clock import FakeClock
from stockade.controller.maps import DryRunMaps, Hits, MapBan, MapFullError
from stockade.controller.service import MAX_REASON, MAX_TTL, BanService, ReconcileReport
from stockade.controller.store import Allow, Ban, BanStore
from stockade.protocol import BAD_INPUT, NOT_FOUND, RUNTIME, CommandError
from stockade.targets import Network, parse_target

NS = 1_000_000_000
MANAGEMENT = ("198.18.200.0/24", "fd00:200::/64")


def net(text: str) -> Network:
    return parse_target(text)


@dataclass
class World:
    store: BanStore
    maps: DryRunMaps
    clock: FakeClock
    service: BanService

    def snapshot(self) -> tuple[Any, ...]:
        return (self.store.bans(), self.store.allows(), self.maps.bans(), self.maps.allows())

    def refused(self, kind: str, method: str, *args: Any, **kwargs: Any) -> CommandError:
        """Call a command that must fail with `kind` and change nothing."""
        before = self.snapshot()
        with pytest.raises(CommandError) as info:
            getattr(self.service, method)(*args, **kwargs)
        assert info.value.kind == kind
        assert self.snapshot() == before
        return info.value


def make_world(tmp_path: Path, capacity: int = 1_000_000) -> World:
    store = BanStore(tmp_path / "bans.db")
    maps = DryRunMaps(capacity=capacity)
    clock = FakeClock()
    service = BanService(store, maps, clock, [net(m) for m in MANAGEMENT])
    return World(store, maps, clock, service)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = make_world(tmp_path)
    try:
        yield w
    finally:
        w.store.close()


# -- ban ----------------------------------------------------------------------------
def test_permanent_ban_goes_to_store_and_maps(world: World) -> None:
    result = world.service.ban("198.18.0.7", reason="scanner")
    now = world.clock.wall()
    assert result == {
        "target": "198.18.0.7",
        "kind": "exact",
        "family": "ipv4",
        "reason": "scanner",
        "source": "cli",
        "created": now,
        "expires": None,
        "ttl_remaining": None,
        "packets": 0,
        "bytes": 0,
        "in_kernel": True,
        "status": "added",
    }
    assert world.store.bans() == [Ban(net("198.18.0.7"), "scanner", "cli", now, None)]
    assert world.maps.bans() == {net("198.18.0.7"): MapBan(expires_ns=0)}


def test_ttl_ban_has_the_right_monotonic_expiry(world: World) -> None:
    mono = world.clock.monotonic_ns()
    result = world.service.ban("fd00::/64", ttl="1h30m", source="proxy")
    assert result["kind"] == "prefix"
    assert result["family"] == "ipv6"
    assert result["expires"] == world.clock.wall() + 5400
    assert result["ttl_remaining"] == 5400
    assert result["reason"] == "manual ban"
    assert world.store.get_ban(net("fd00::/64")) == Ban(
        net("fd00::/64"), "manual ban", "proxy", world.clock.wall(), world.clock.wall() + 5400
    )
    assert world.maps.bans()[net("fd00::/64")].expires_ns == mono + 5400 * NS


def test_bare_address_and_slash_32_are_one_ban(world: World) -> None:
    assert world.service.ban("198.18.0.7")["status"] == "added"
    assert world.service.ban("198.18.0.7/32")["status"] == "updated"
    assert [b["target"] for b in world.service.list_bans()] == ["198.18.0.7"]
    assert list(world.maps.bans()) == [net("198.18.0.7")]


def test_reban_updates_and_keeps_hit_counters(world: World) -> None:
    world.service.ban("198.18.0.7", ttl="1h", reason="first")
    target = net("198.18.0.7")
    # the kernel counted some drops
    world.maps._bans[target] = MapBan(world.maps._bans[target].expires_ns, Hits(5, 300))
    world.clock.advance(60)
    result = world.service.ban("198.18.0.7", reason="second")  # now permanent
    assert result["status"] == "updated"
    assert world.maps.bans() == {target: MapBan(expires_ns=0, hits=Hits(5, 300))}
    assert world.store.bans() == [Ban(target, "second", "cli", world.clock.wall(), None)]
    listed = world.service.list_bans()
    assert [(b["packets"], b["bytes"], b["reason"]) for b in listed] == [(5, 300, "second")]


def test_reban_of_an_expired_unswept_ban_is_added(world: World) -> None:
    world.service.ban("198.18.0.7", ttl="90s")
    world.clock.advance(90)
    assert world.service.ban("198.18.0.7", ttl="90s")["status"] == "added"


def test_ttl_ban_expires_on_sweep(world: World) -> None:
    world.service.ban("198.18.0.7", ttl="90s")
    world.service.ban("198.18.0.8")  # permanent, stays
    world.clock.advance(89)
    assert world.service.sweep() == []
    assert net("198.18.0.7") in world.maps.bans()
    assert world.service.list_bans()[0]["ttl_remaining"] == 1
    world.clock.advance(1)
    # expired bans are hidden before the sweeper gets to them
    assert [b["target"] for b in world.service.list_bans()] == ["198.18.0.8"]
    assert world.service.sweep() == [net("198.18.0.7")]
    assert [b.target for b in world.store.bans()] == [net("198.18.0.8")]
    assert list(world.maps.bans()) == [net("198.18.0.8")]
    assert world.service.sweep() == []


@pytest.mark.parametrize(
    ("target", "inside"),
    [
        ("198.18.200.5", "198.18.200.0/24"),
        ("198.18.200.0/24", "198.18.200.0/24"),
        ("198.18.200.128/25", "198.18.200.0/24"),
        ("fd00:200::1", "fd00:200::/64"),
    ],
)
def test_ban_inside_a_management_network_is_refused(world: World, target: str, inside: str) -> None:
    world.service.ban("198.18.0.1")
    error = world.refused(BAD_INPUT, "ban", target, ttl="1h")
    assert f"inside {inside}, a management network in the config" in error.message
    assert error.hint is not None and "xdp.management_networks" in error.hint


def test_ban_inside_an_allowlist_entry_is_refused(world: World) -> None:
    world.service.allow_add("198.18.9.0/24", reason="office")
    error = world.refused(BAD_INPUT, "ban", "198.18.9.77")
    assert "refusing to ban 198.18.9.77: it is inside 198.18.9.0/24, in the allowlist" in (
        error.message
    )
    assert error.hint == "remove it with `stockade allow remove 198.18.9.0/24` first"


def test_ban_of_a_neighbour_of_the_management_network_is_fine(world: World) -> None:
    assert world.service.ban("198.18.201.1")["status"] == "added"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": "198.18.0.7/24"}, "did you mean 198.18.0.0/24?"),
        ({"target": "nonsense"}, "invalid target 'nonsense'"),
        ({"target": ""}, "empty target"),
        ({"target": "198.18.0.7", "ttl": "0s"}, "must be longer than 0s"),
        ({"target": "198.18.0.7", "ttl": "5x"}, "invalid duration '5x'"),
        ({"target": "198.18.0.7", "ttl": "-1m"}, "invalid duration '-1m'"),
        ({"target": "198.18.0.7", "ttl": ""}, "invalid duration ''"),
        ({"target": "198.18.0.7", "ttl": f"{MAX_TTL + 1}s"}, "at most"),
        ({"target": "198.18.0.7", "reason": "x" * (MAX_REASON + 1)}, "at most 200"),
        ({"target": "198.18.0.7", "reason": "line\nbreak"}, "control characters"),
        ({"target": "198.18.0.7", "reason": "nul\x00"}, "control characters"),
        ({"target": "198.18.0.7", "reason": "\x1b[31mred"}, "control characters"),
        ({"target": "198.18.0.7", "reason": "bidi\u202e"}, "control characters"),
        ({"target": "198.18.0.7", "source": "hacker"}, "source must be one of"),
    ],
)
def test_bad_ban_input_is_refused(world: World, kwargs: dict[str, Any], message: str) -> None:
    world.service.ban("198.18.0.1", ttl="1h")
    error = world.refused(BAD_INPUT, "ban", **kwargs)
    assert message in error.message


def test_longest_reason_is_accepted_and_blank_means_default(world: World) -> None:
    assert world.service.ban("198.18.0.7", reason="é" * MAX_REASON)["reason"] == "é" * MAX_REASON
    assert world.service.ban("198.18.0.8", reason="   ")["reason"] == "manual ban"


def test_map_full_rolls_back_the_store(tmp_path: Path) -> None:
    w = make_world(tmp_path, capacity=2)
    try:
        w.service.ban("198.18.0.1")
        w.service.ban("198.18.0.2", ttl="1h")
        error = w.refused(RUNTIME, "ban", "198.18.0.3")
        assert "cannot ban 198.18.0.3" in error.message
        assert error.hint is not None and "max_bans" in error.hint
        assert w.store.get_ban(net("198.18.0.3")) is None
        # an existing entry can still be updated when the map is full
        assert w.service.ban("198.18.0.2")["status"] == "updated"
        assert w.maps.bans()[net("198.18.0.2")].expires_ns == 0
    finally:
        w.store.close()


# -- unban --------------------------------------------------------------------------
def test_unban_removes_from_store_and_maps(world: World) -> None:
    world.service.ban("198.18.0.7")
    world.service.ban("198.18.0.8")
    assert world.service.unban("198.18.0.7/32") == {"target": "198.18.0.7", "status": "removed"}
    assert [b.target for b in world.store.bans()] == [net("198.18.0.8")]
    assert list(world.maps.bans()) == [net("198.18.0.8")]


def test_unban_of_a_missing_target_is_not_found(world: World) -> None:
    world.service.ban("198.18.0.8")
    error = world.refused(NOT_FOUND, "unban", "198.18.0.7")
    assert error.message == "198.18.0.7 is not banned"
    assert error.hint == "list bans with `stockade bans`"


def test_unban_bad_target_is_bad_input(world: World) -> None:
    world.refused(BAD_INPUT, "unban", "198.18.0.7/24")


def test_unban_removes_a_stale_map_entry(world: World) -> None:
    world.maps.put_ban(net("198.18.0.9"), 0)  # left behind, not in the store
    assert world.service.unban("198.18.0.9")["status"] == "removed"
    assert world.maps.bans() == {}


# -- allowlist ----------------------------------------------------------------------
def test_allow_add_and_remove(world: World) -> None:
    world.service.ban("198.18.9.7")
    result = world.service.allow_add("198.18.9.0/24", reason="office")
    assert result == {"target": "198.18.9.0/24", "status": "added", "shadowed_bans": ["198.18.9.7"]}
    assert [(a.target, a.reason) for a in world.store.allows()] == [
        (net("198.18.9.0/24"), "office")
    ]
    assert net("198.18.9.0/24") in world.maps.allows()
    assert world.service.allow_remove("198.18.9.0/24") == {
        "target": "198.18.9.0/24",
        "status": "removed",
    }
    assert world.store.allows() == []
    assert world.maps.allows() == {}


def test_allow_remove_of_a_management_network_is_refused(world: World) -> None:
    world.service.reconcile()
    error = world.refused(BAD_INPUT, "allow_remove", "198.18.200.0/24")
    assert "management network" in error.message
    assert error.hint is not None and "xdp.management_networks" in error.hint


def test_allow_remove_of_a_missing_entry_is_not_found(world: World) -> None:
    world.service.allow_add("198.18.9.0/24")
    error = world.refused(NOT_FOUND, "allow_remove", "198.18.8.0/24")
    assert error.message == "198.18.8.0/24 is not in the allowlist"


@pytest.mark.parametrize(
    ("target", "reason"),
    [("198.18.9.1/24", None), ("x", None), ("198.18.9.0/24", "a\tb"), ("198.18.9.0/24", "r" * 201)],
)
def test_bad_allow_input_is_refused(world: World, target: str, reason: str | None) -> None:
    world.refused(BAD_INPUT, "allow_add", target, reason)


def test_allow_map_full_rolls_back_the_store(world: World) -> None:
    class FullAllows(DryRunMaps):
        def put_allow(self, net: Network) -> None:
            raise MapFullError("dry-run allow map is full")

    world.service.maps = world.maps = FullAllows()
    error = world.refused(RUNTIME, "allow_add", "198.18.9.0/24")
    assert error.hint == "raise xdp.max_allow"


def test_allow_list_shows_management_networks_first(world: World) -> None:
    world.service.reconcile()
    world.service.allow_add("fd00:9::/64", reason="lab")
    with pytest.raises(CommandError, match="already allowed as a management network") as err:
        world.service.allow_add("198.18.200.0/24", reason="duplicate of the config")
    assert err.value.kind == BAD_INPUT
    assert [a.target for a in world.store.allows()] == [net("fd00:9::/64")]
    rows = world.service.allow_list()
    assert [(r["target"], r["source"], r["reason"]) for r in rows] == [
        ("198.18.200.0/24", "config", "management network (config)"),
        ("fd00:200::/64", "config", "management network (config)"),
        ("fd00:9::/64", "cli", "lab"),
    ]
    assert all(r["packets"] == 0 and r["bytes"] == 0 for r in rows)


def test_allow_add_again_reports_updated(world: World) -> None:
    assert world.service.allow_add("fd00:9::/64", reason="lab")["status"] == "added"
    assert world.service.allow_add("fd00:9::/64", reason="lab 2")["status"] == "updated"
    assert [(a.target, a.reason) for a in world.store.allows()] == [(net("fd00:9::/64"), "lab 2")]


# -- reconcile ----------------------------------------------------------------------
def test_reconcile_makes_the_maps_equal_the_store(world: World) -> None:
    now, mono = world.clock.wall(), world.clock.monotonic_ns()
    store, maps = world.store, world.maps
    correct = net("198.18.0.1")
    wrong_expiry = net("198.18.0.2")
    missing = net("198.18.4.0/24")
    expired = net("198.18.0.3")
    extra = net("fd00::99")
    close_enough = net("198.18.0.4")
    store.put_ban(Ban(correct, "r", "cli", now, None))
    store.put_ban(Ban(wrong_expiry, "r", "cli", now, now + 3600))
    store.put_ban(Ban(missing, "r", "cli", now, None))
    store.put_ban(Ban(expired, "r", "cli", now - 7200, now - 3600))
    store.put_ban(Ban(close_enough, "r", "cli", now, now + 600))
    store.put_allow(Allow(net("198.18.9.0/24"), "office", now))
    maps.put_ban(correct, 0)
    maps._bans[correct] = MapBan(0, Hits(7, 700))
    maps.put_ban(wrong_expiry, mono + 10 * NS)
    maps.put_ban(expired, mono + 1)
    maps.put_ban(extra, 0)
    maps.put_ban(close_enough, mono + 600 * NS + NS // 2)  # within the tolerance
    maps.put_allow(net("198.18.7.0/24"))  # not wanted
    maps.writes = 0

    report = world.service.reconcile()

    assert report == ReconcileReport(added=4, updated=1, removed=3, failed=0)
    assert maps.bans() == {
        correct: MapBan(0, Hits(7, 700)),
        wrong_expiry: MapBan(mono + 3600 * NS),
        missing: MapBan(0),
        close_enough: MapBan(mono + 600 * NS + NS // 2),
    }
    assert set(maps.allows()) == {net("198.18.9.0/24"), net(MANAGEMENT[0]), net(MANAGEMENT[1])}
    # 3 allows added, 1 removed; 1 ban fixed, 1 added, 2 removed; nothing else touched
    assert maps.writes == 8

    # a second run finds nothing to do, also after time has passed
    world.clock.advance(100)
    assert world.service.reconcile() == ReconcileReport()
    assert maps.writes == 8


def test_reconcile_reports_bans_that_do_not_fit(tmp_path: Path) -> None:
    w = make_world(tmp_path, capacity=1)
    try:
        for target in ("198.18.0.1", "198.18.0.2", "198.18.0.3"):
            w.store.put_ban(Ban(net(target), "r", "cli", w.clock.wall(), None))
        report = w.service.reconcile()
        assert (report.added, report.failed) == (2 + 1, 2)  # 2 management allows + 1 ban
        assert len(w.maps.bans()) == 1
    finally:
        w.store.close()


# -- stats --------------------------------------------------------------------------
def test_stats_shape(world: World) -> None:
    result = world.service.stats()
    assert result["total_packets"] == 0
    assert set(result["reasons"]) >= {"pass", "allow", "drop_ban", "drop_rate", "malformed"}
    assert all(v == {"packets": 0, "bytes": 0} for v in result["reasons"].values())
