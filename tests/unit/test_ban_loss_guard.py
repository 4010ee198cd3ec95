"""Never lift bans without being told: the removal guard, rebuilding the store from
the maps, and bans that do not fit in the kernel (BanService on DryRunMaps).

The same behaviour through a real controller, CLI and kernel maps is in
tests/cli/test_cli_ban_store_guard.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from stockade.clock import FakeClock
from stockade.config import ConfigError, parse_config
from stockade.controller import daemon, metrics
from stockade.controller.maps import DryRunMaps, Hits, MapBan
from stockade.controller.service import (
    EXPIRY_TOLERANCE_NS,
    REBUILT_REASON,
    REBUILT_SOURCE,
    BanLossRefused,
    BanService,
    ReconcileReport,
    RemovalGuard,
)
from stockade.controller.store import Ban, BanStore, inspect_store
from stockade.targets import Network, parse_target

NS = 1_000_000_000
MANAGEMENT = "198.18.200.0/24"


def net(text: str) -> Network:
    return parse_target(text)


def v4(i: int) -> Network:
    return net(f"198.18.{i // 250}.{i % 250 + 1}")


class CountingMaps(DryRunMaps):
    """DryRunMaps that also counts ban writes tried, failed ones included."""

    def __init__(self, capacity: int = 1_000_000) -> None:
        super().__init__(capacity)
        self.ban_attempts = 0

    def put_ban(self, net: Network, expires_ns: int) -> None:
        self.ban_attempts += 1
        super().put_ban(net, expires_ns)


@dataclass
class World:
    store: BanStore
    maps: CountingMaps
    clock: FakeClock
    service: BanService

    def snapshot(self) -> tuple[Any, ...]:
        return (
            self.store.bans(),
            self.store.allows(),
            self.maps.bans(),
            self.maps.allows(),
            self.maps.writes,
        )

    def store_ban(self, target: Network, ttl: float | None = None, at: float | None = None) -> Ban:
        now = self.clock.wall() if at is None else at
        ban = Ban(target, "r", "cli", now, None if ttl is None else now + ttl)
        self.store.put_ban(ban)
        return ban


@pytest.fixture
def make_world(tmp_path: Path) -> Iterator[Any]:
    stores: list[BanStore] = []

    def make(capacity: int = 1_000_000) -> World:
        store = BanStore(tmp_path / f"bans-{len(stores)}.db")
        stores.append(store)
        maps = CountingMaps(capacity)
        clock = FakeClock()
        return World(store, maps, clock, BanService(store, maps, clock, [net(MANAGEMENT)]))

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def world(make_world: Any) -> World:
    w: World = make_world()
    return w


# -- the guard's decision ------------------------------------------------------------
@given(
    lifting=st.integers(0, 10_000),
    in_kernel=st.integers(0, 10_000),
    share=st.floats(0.01, 1.0),
    allowance=st.integers(0, 1000),
)
def test_the_guard_refuses_exactly_beyond_both_the_allowance_and_the_share(
    lifting: int, in_kernel: int, share: float, allowance: int
) -> None:
    guard = RemovalGuard(share, allowance)
    refused = guard.refuses(lifting, in_kernel)
    assert refused == (lifting > allowance and lifting > share * in_kernel)
    if lifting <= allowance:
        assert not refused  # a handful may always go
    if refused:
        assert guard.refuses(lifting + 1, in_kernel)  # lifting more is refused too
    if share == 1.0 and lifting <= in_kernel:
        assert not refused  # 1.0 turns the check off


# -- reconcile with a guard: refused before anything changes --------------------------
def test_a_reconcile_that_lifts_too_many_changes_nothing(world: World) -> None:
    for i in range(50):
        world.maps.put_ban(v4(i), 0)
    for i in range(10):  # the store kept 10 of the kernel's 50
        world.store_ban(v4(i))
    world.maps.writes = 0
    before = world.snapshot()
    with pytest.raises(BanLossRefused) as info:
        world.service.reconcile(RemovalGuard(0.5, 10))
    assert (info.value.lifting, info.value.in_kernel) == (40, 50)
    assert "would lift 40 of the 50 bans in the kernel" in str(info.value)
    # not even the management network's allow entry went in
    assert world.snapshot() == before
    assert world.maps.ban_attempts == 50  # only the set-up's writes


def test_a_reconcile_within_the_share_goes_ahead(world: World) -> None:
    for i in range(50):
        world.maps.put_ban(v4(i), 0)
    for i in range(25):
        world.store_ban(v4(i))
    report = world.service.reconcile(RemovalGuard(0.5, 10))  # 25 of 50: not more than half
    assert report.removed == 25
    assert set(world.maps.bans()) == {v4(i) for i in range(25)}


def test_a_handful_may_always_go(world: World) -> None:
    for i in range(4):
        world.maps.put_ban(v4(i), 0)
    world.service.reconcile(RemovalGuard(0.5, 10))  # all 4 of 4, within the allowance
    assert world.maps.bans() == {}


def test_expired_kernel_entries_do_not_count_towards_the_share(world: World) -> None:
    mono = world.clock.monotonic_ns()
    for i in range(50):
        world.maps.put_ban(v4(i), mono - 1)  # expired: the kernel ignores them already
    for i in range(50, 60):
        world.maps.put_ban(v4(i), mono + 60 * NS)
        world.store_ban(v4(i), ttl=60)
    plan = world.service.plan_bans()
    assert (plan.lifting, plan.in_kernel) == (0, 10)
    report = world.service.reconcile(RemovalGuard(0.5, 0))
    assert report.removed == 50
    assert set(world.maps.bans()) == {v4(i) for i in range(50, 60)}


def test_without_a_guard_everything_the_store_lacks_is_lifted(world: World) -> None:
    for i in range(50):
        world.maps.put_ban(v4(i), 0)
    assert world.service.reconcile().removed == 50  # --accept-ban-loss


# -- rebuilding the store from the maps ------------------------------------------------
def test_rebuild_puts_the_kernels_bans_into_the_store(world: World) -> None:
    now, mono = world.clock.wall(), world.clock.monotonic_ns()
    permanent, timed, prefix = net("198.18.0.1"), net("fd00::7"), net("198.18.4.0/24")
    world.maps.put_ban(permanent, 0)
    world.maps._bans[permanent] = MapBan(0, Hits(7, 700))
    world.maps.put_ban(timed, mono + 3600 * NS)
    world.maps.put_ban(prefix, mono + 90 * NS)
    world.maps.put_ban(net("198.18.0.9"), mono - 1)  # expired in the kernel: not rebuilt
    kept = world.store_ban(net("198.18.4.0/24"), ttl=7200, at=now - 100)  # the store knows it

    assert world.service.rebuild_from_maps() == 2
    stored = {b.target: b for b in world.store.bans()}
    assert set(stored) == {permanent, timed, prefix}
    assert stored[prefix] == kept  # the store's own ban is the truth
    for target, expires in ((permanent, None), (timed, now + 3600)):
        ban = stored[target]
        assert (ban.reason, ban.source, ban.created, ban.expires) == (
            REBUILT_REASON,
            REBUILT_SOURCE,
            now,
            expires,
        )
    assert json.loads(stored[permanent].details or "") == {
        "rebuilt_from_kernel": {"at": now, "bytes": 700, "expires_ns": 0, "packets": 7}
    }
    history = world.store.events(timed)
    assert [(e.action, e.source, e.reason, e.ttl) for e in history] == [
        ("ban", REBUILT_SOURCE, REBUILT_REASON, 3600)
    ]
    # the maps already match the rebuilt store: nothing to lift, nothing to rewrite
    world.maps.writes = 0
    report = world.service.reconcile(RemovalGuard(0.5, 0))
    assert (report.updated, report.removed, report.failed) == (1, 1, 0)  # .9 expired; prefix
    assert world.maps.bans()[permanent] == MapBan(0, Hits(7, 700))
    assert world.maps.bans()[timed].expires_ns == mono + 3600 * NS


# From a millisecond: a wall-clock float near 1.8e9 s cannot hold a sub-microsecond rest
@given(left=st.integers(NS // 1000, 10 * 365 * 86400 * NS))
def test_a_rebuilt_expiry_projects_back_to_the_kernels(tmp_path_factory: Any, left: int) -> None:
    store = BanStore(tmp_path_factory.mktemp("rebuild") / "bans.db")
    try:
        maps, clock = DryRunMaps(), FakeClock()
        service = BanService(store, maps, clock)
        target = net("198.18.0.1")
        maps.put_ban(target, clock.monotonic_ns() + left)
        assert service.rebuild_from_maps() == 1
        plan = service.plan_bans()
        projected = plan.want[target]
        assert abs(projected - (clock.monotonic_ns() + left)) < EXPIRY_TOLERANCE_NS
    finally:
        store.close()


# -- bans that do not fit --------------------------------------------------------------
def test_bans_that_do_not_fit_are_listed_as_not_in_the_kernel(make_world: Any) -> None:
    w: World = make_world(capacity=3)
    for i in range(5):
        w.store_ban(v4(i), at=w.clock.wall() + i)  # created in this order
    report = w.service.reconcile(RemovalGuard())
    assert report.failed == 2
    assert list(w.service.unenforced) == [v4(3), v4(4)]  # the oldest got the room
    listed = {b["target"]: b["in_kernel"] for b in w.service.list_bans()}
    assert listed == {str(v4(i).network_address): i < 3 for i in range(5)}
    explained = w.service.explain(str(v4(4).network_address))
    assert explained["verdict"] == "not_in_kernel"
    assert [b["in_kernel"] for b in explained["bans"]] == [False]
    assert w.service.explain(str(v4(0).network_address))["verdict"] == "banned"


def test_a_prefix_in_the_kernel_still_bans_an_address_that_is_not(make_world: Any) -> None:
    w: World = make_world(capacity=1)
    w.store_ban(net("198.18.0.0/16"), at=w.clock.wall() - 1)
    w.store_ban(net("198.18.0.7"))
    w.service.reconcile()
    explained = w.service.explain("198.18.0.7")
    assert [(b["target"], b["in_kernel"]) for b in explained["bans"]] == [
        ("198.18.0.7", False),
        ("198.18.0.0/16", True),
    ]
    assert explained["verdict"] == "banned"  # the /16 drops it


def test_the_sweep_puts_them_in_as_room_appears(make_world: Any) -> None:
    w: World = make_world(capacity=3)
    t0 = w.clock.wall()
    w.store_ban(v4(0), ttl=30, at=t0)
    for i in range(1, 6):
        w.store_ban(v4(i), at=t0 + i)
    w.service.reconcile()
    assert list(w.service.unenforced) == [v4(3), v4(4), v4(5)]

    w.maps.ban_attempts = 0
    w.service.sweep()  # still full: one failed write for the map, not one per ban
    assert w.maps.ban_attempts == 1
    assert list(w.service.unenforced) == [v4(3), v4(4), v4(5)]

    w.service.unban(str(v4(1).network_address))  # lifting one makes room for one
    assert v4(3) not in w.maps.bans()
    w.service.sweep()
    assert v4(3) in w.maps.bans()
    assert list(w.service.unenforced) == [v4(4), v4(5)]

    w.clock.advance(31)  # v4(0) expires: the sweep removes it and fills its place
    w.service.sweep()
    assert set(w.maps.bans()) == {v4(2), v4(3), v4(4)}
    assert list(w.service.unenforced) == [v4(5)]
    assert [b["in_kernel"] for b in w.service.list_bans()] == [True, True, True, False]


def test_lifting_a_ban_that_is_not_in_the_kernel_forgets_it(make_world: Any) -> None:
    w: World = make_world(capacity=1)
    w.store_ban(v4(0), at=w.clock.wall() - 1)
    w.store_ban(v4(1))
    w.service.reconcile()
    assert list(w.service.unenforced) == [v4(1)]
    assert w.service.unban(str(v4(1).network_address))["status"] == "removed"
    assert w.service.unenforced == {}
    w.maps.ban_attempts = 0
    w.service.sweep()
    assert w.maps.ban_attempts == 0


def test_a_ban_that_later_fits_by_command_is_in_the_kernel(make_world: Any) -> None:
    w: World = make_world(capacity=1)
    w.store_ban(v4(0), at=w.clock.wall() - 1)
    w.store_ban(v4(1))
    w.service.reconcile()
    w.service.unban(str(v4(0).network_address))
    w.service.ban(str(v4(1).network_address), ttl="1h")  # set again before the sweep
    assert w.service.unenforced == {}
    assert [b["in_kernel"] for b in w.service.list_bans()] == [True]


def test_an_expired_ban_that_never_fitted_leaves_the_queue(make_world: Any) -> None:
    w: World = make_world(capacity=1)
    w.store_ban(v4(0), at=w.clock.wall() - 1)
    w.store_ban(v4(1), ttl=10)
    w.service.reconcile()
    w.clock.advance(11)
    w.service.sweep()
    assert w.service.unenforced == {}
    assert w.store.get_ban(v4(1)) is None


def test_reconcile_lifts_before_it_adds(make_world: Any) -> None:
    """A full map with stale entries: lifting them first makes room for the wanted bans."""
    w: World = make_world(capacity=3)
    for i in range(3):
        w.maps.put_ban(v4(100 + i), 0)
    for i in range(3):
        w.store_ban(v4(i))
    assert w.service.reconcile() == ReconcileReport(added=4, removed=3)  # 1 allow, 3 bans
    assert w.service.unenforced == {}


# -- config ----------------------------------------------------------------------------
def test_the_guard_keys_and_their_defaults() -> None:
    default = parse_config({}).controller
    assert (default.reconcile_max_removal_share, default.reconcile_removal_allowance) == (0.5, 10)
    set_ = parse_config(
        {"controller": {"reconcile_max_removal_share": 1, "reconcile_removal_allowance": 0}}
    ).controller
    assert (set_.reconcile_max_removal_share, set_.reconcile_removal_allowance) == (1.0, 0)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("reconcile_max_removal_share", 0, "out of range"),
        ("reconcile_max_removal_share", 1.5, "out of range"),
        ("reconcile_max_removal_share", -0.1, "out of range"),
        ("reconcile_max_removal_share", float("nan"), "out of range"),
        ("reconcile_max_removal_share", True, "got a boolean"),
        ("reconcile_max_removal_share", "half", "expected"),
        ("reconcile_removal_allowance", -1, "out of range"),
        ("reconcile_removal_allowance", 0.5, "expected an integer"),
    ],
)
def test_bad_guard_keys_are_refused(key: str, value: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=f"controller.{key}: .*{message}"):
        parse_config({"controller": {key: value}})


# -- metrics ---------------------------------------------------------------------------
def test_metrics_show_bans_not_in_the_kernel_and_map_fill() -> None:
    snapshot = metrics.Snapshot(
        counters={},
        bans={("cli", "exact", "ipv4"): 20},
        allows=1,
        events={},
        syn_events=0,
        events_lost=0,
        monitor=False,
        not_in_kernel=12,
        map_fill={"ban_v4": (8, 8), "allow_v4": (1, 256)},
    )
    text = metrics.render(lambda: snapshot).decode()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert values[("stockade_bans_not_in_kernel", ())] == 12
    assert values[("stockade_map_entries", (("map", "ban_v4"),))] == 8
    assert values[("stockade_map_max_entries", (("map", "ban_v4"),))] == 8
    assert values[("stockade_map_fill_ratio", (("map", "ban_v4"),))] == 1.0
    assert values[("stockade_map_fill_ratio", (("map", "allow_v4"),))] == 1 / 256


# -- the controller's decision on the store it found (without a kernel) ------------------
@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Any]:
    """Controller._open_store against maps holding `held` bans; closes what it opened."""
    controllers: list[daemon.Controller] = []

    def run(held: int, recovery: str | None = None) -> BanStore:
        config = parse_config({"controller": {"state_dir": str(tmp_path)}})
        controller = daemon.Controller(config, recovery=recovery)
        controllers.append(controller)
        maps = DryRunMaps()
        for i in range(held):
            maps.put_ban(v4(i), 0)
        controller.maps = maps  # type: ignore[assignment]  # only bans() is read
        found = inspect_store(config.controller.ban_db, FakeClock().wall())
        controller.store = controller._open_store(found)
        return controller.store

    yield run
    for controller in controllers:
        controller.close()


def test_a_missing_store_is_made_when_the_kernel_holds_nothing(
    open_store: Any, tmp_path: Path
) -> None:
    assert open_store(held=0).bans() == []
    assert (tmp_path / "bans.db").exists()


def test_a_missing_store_is_refused_while_the_kernel_holds_bans(
    open_store: Any, tmp_path: Path
) -> None:
    with pytest.raises(
        daemon.StartupError, match=r"does not exist but the kernel maps in .* hold 3"
    ):
        open_store(held=3)
    assert list(tmp_path.iterdir()) == []  # nothing created


def test_a_store_that_fails_only_when_opened_for_writing_is_damaged(
    open_store: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Damage only the writable open shows (as a garbled schema would) is handled like
    the damage inspect_store finds: refused, or with an option set aside."""
    store = BanStore(tmp_path / "bans.db")
    store.close()
    content = (tmp_path / "bans.db").read_bytes()
    real = daemon.BanStore
    calls: list[Path] = []

    def failing_once(path: Path) -> BanStore:
        calls.append(path)
        if len(calls) == 1:
            raise sqlite3.DatabaseError("malformed database schema (bans)")
        return real(path)

    monkeypatch.setattr(daemon, "BanStore", failing_once)
    with pytest.raises(daemon.StartupError, match=r"is damaged \(SQLite: malformed"):
        open_store(held=0)
    assert (tmp_path / "bans.db").read_bytes() == content

    calls.clear()
    opened = open_store(held=5, recovery=daemon.ACCEPT_BAN_LOSS)
    assert opened.bans() == []
    (aside,) = tmp_path.glob("bans.db.damaged-*[0-9]Z")
    assert aside.read_bytes() == content
