"""The ban history (`ban_events`): written with each change, upgraded in place, pruned by age."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from stockade.clock import FakeClock
from stockade.controller.maps import DryRunMaps
from stockade.controller.service import BanService
from stockade.controller.store import SCHEMA_VERSION, Ban, BanEvent, BanStore
from stockade.protocol import RUNTIME, CommandError
from stockade.targets import Network, parse_target

DAY = 86400.0


def net(text: str) -> Network:
    return parse_target(text)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[BanStore]:
    s = BanStore(tmp_path / "bans.db")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def service(store: BanStore, clock: FakeClock) -> BanService:
    return BanService(store, DryRunMaps(), clock, history_retention=30 * DAY)


def actions(store: BanStore, target: str) -> list[tuple[str, float, float | None]]:
    return [(e.action, e.at, e.ttl) for e in store.events(net(target))]


def test_ban_update_unban_are_recorded_newest_first(
    service: BanService, store: BanStore, clock: FakeClock
) -> None:
    t0 = clock.wall()
    service.ban("198.18.0.7", ttl="1h", reason="scanner")
    clock.advance(10)
    service.ban("198.18.0.7", reason="still scanning")  # permanent now
    clock.advance(10)
    service.unban("198.18.0.7")
    assert actions(store, "198.18.0.7") == [
        ("unban", t0 + 20, None),
        ("ban", t0 + 10, None),
        ("ban", t0, 3600.0),
    ]
    unban, _permanent, first = store.events(net("198.18.0.7"))
    # an unban names the ban it lifted
    assert (unban.source, unban.reason) == ("cli", "still scanning")
    assert (first.source, first.reason, first.rule, first.details) == ("cli", "scanner", None, None)
    assert store.events(net("198.18.0.8")) == []


def test_sweep_records_expiry_at_the_expiry_time(
    service: BanService, store: BanStore, clock: FakeClock
) -> None:
    t0 = clock.wall()
    service.ban("198.18.0.7", ttl="90s", source="proxy", reason="flood")
    clock.advance(300)  # swept late: the event still says when the ban ended
    assert service.sweep() == [net("198.18.0.7")]
    assert actions(store, "198.18.0.7") == [("expire", t0 + 90, None), ("ban", t0, 90.0)]
    assert store.events(net("198.18.0.7"))[0].source == "proxy"


def test_history_is_limited_per_query(service: BanService, store: BanStore) -> None:
    for _ in range(60):
        service.ban("198.18.0.7", ttl="1h")
    assert len(store.events(net("198.18.0.7"))) == 50
    assert len(store.events(net("198.18.0.7"), limit=5)) == 5


def test_a_refused_ban_leaves_no_event(tmp_path: Path, clock: FakeClock) -> None:
    store = BanStore(tmp_path / "bans.db")
    try:
        service = BanService(store, DryRunMaps(capacity=1), clock)
        service.ban("198.18.0.1")
        with pytest.raises(CommandError) as info:
            service.ban("198.18.0.2")  # the map is full: store and history roll back
        assert info.value.kind == RUNTIME
        assert store.events(net("198.18.0.2")) == []
        assert store.get_ban(net("198.18.0.2")) is None
    finally:
        store.close()


def test_sweep_prunes_events_older_than_the_retention(store: BanStore, clock: FakeClock) -> None:
    service = BanService(store, DryRunMaps(), clock, history_retention=7 * DAY)
    service.ban("198.18.0.7", ttl="1h")
    clock.advance(3 * DAY)
    service.ban("198.18.0.8", ttl="1h")
    clock.advance(4 * DAY - 1)
    service.sweep()  # writes both expiries; nothing is old enough yet
    assert [e.action for e in store.events(net("198.18.0.7"))] == ["expire", "ban"]
    clock.advance(3601)  # the first ban is now 7d1h old, its expiry exactly 7d (kept)
    service.sweep()
    assert [e.action for e in store.events(net("198.18.0.7"))] == ["expire"]
    clock.advance(DAY)
    service.sweep()
    assert store.events(net("198.18.0.7")) == []
    assert [e.action for e in store.events(net("198.18.0.8"))] == ["expire", "ban"]


def test_count_events_counts_only_that_action_source_and_window(
    store: BanStore, clock: FakeClock
) -> None:
    t = net("198.18.0.7")
    now = clock.wall()
    with store.transaction():
        store.add_event(BanEvent(t, now - 100, "ban", "rule", "r", 60.0, "scan"))
        store.add_event(BanEvent(t, now - 50, "ban", "rule", "r", 60.0, "other-rule"))
        store.add_event(BanEvent(t, now - 40, "ban", "cli", "r", None))
        store.add_event(BanEvent(t, now - 30, "expire", "rule", "r", None, "scan"))
        store.add_event(BanEvent(net("198.18.0.8"), now - 10, "ban", "rule", "r", 60.0))
    assert store.count_events(t, "ban", "rule", now - 1000) == 2
    assert store.count_events(t, "ban", "rule", now - 100) == 1  # strictly after
    assert store.count_events(t, "ban", "cli", now - 1000) == 1


def test_an_unknown_action_is_refused(store: BanStore, clock: FakeClock) -> None:
    with pytest.raises(ValueError, match="unknown ban event action"):
        store.add_event(BanEvent(net("198.18.0.7"), clock.wall(), "ponder", "cli", "r"))


def test_covering_bans_finds_the_address_and_its_prefixes(store: BanStore) -> None:
    for target in ("198.18.0.7", "198.18.0.0/24", "198.16.0.0/14", "198.18.1.0/24", "fd00::/8"):
        store.put_ban(Ban(net(target), "r", "cli", 1.0, None))
    found = [str(b.target) for b in store.covering_bans(net("198.18.0.7"))]
    assert found == ["198.18.0.7/32", "198.18.0.0/24", "198.16.0.0/14"]
    assert [str(b.target) for b in store.covering_bans(net("198.18.0.0/25"))] == [
        "198.18.0.0/24",
        "198.16.0.0/14",
    ]
    assert [str(b.target) for b in store.covering_bans(net("fd00::1"))] == ["fd00::/8"]
    assert store.covering_bans(net("10.0.0.1")) == []


def test_rule_and_details_are_stored_with_the_ban(store: BanStore) -> None:
    ban = Ban(net("198.18.0.7"), "r", "rule", 1.0, 61.0, "scan-404", '{"404s":120}')
    store.put_ban(ban)
    assert store.get_ban(net("198.18.0.7")) == ban
    store.put_ban(Ban(net("198.18.0.7"), "manual", "cli", 2.0, None))
    assert store.get_ban(net("198.18.0.7")) == Ban(net("198.18.0.7"), "manual", "cli", 2.0, None)


# -- schema upgrade -------------------------------------------------------------------
V1_SCHEMA = """
CREATE TABLE bans (
    target  TEXT PRIMARY KEY,
    reason  TEXT NOT NULL,
    source  TEXT NOT NULL,
    created REAL NOT NULL,
    expires REAL
);
CREATE INDEX bans_expires ON bans (expires);
CREATE TABLE allows (
    target  TEXT PRIMARY KEY,
    reason  TEXT NOT NULL,
    created REAL NOT NULL
);
INSERT INTO bans VALUES ('198.18.0.7', 'scanner', 'cli', 1.0, NULL);
INSERT INTO allows VALUES ('198.18.9.0/24', 'office', 1.0);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_is_upgraded_in_place(tmp_path: Path, clock: FakeClock) -> None:
    db = tmp_path / "bans.db"
    with closing(sqlite3.connect(db)) as old:
        old.executescript(V1_SCHEMA)
    store = BanStore(db)
    try:
        assert store.bans() == [Ban(net("198.18.0.7"), "scanner", "cli", 1.0, None)]
        assert [a.reason for a in store.allows()] == ["office"]
        service = BanService(store, DryRunMaps(), clock)
        service.unban("198.18.0.7")
        assert [e.action for e in store.events(net("198.18.0.7"))] == ["unban"]
    finally:
        store.close()
    with closing(sqlite3.connect(db)) as other:
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
        columns = {row[1] for row in other.execute("PRAGMA table_info(bans)")}
        assert {"rule", "details"} <= columns
    BanStore(db).close()  # opening an up-to-date database again changes nothing


def test_a_failed_upgrade_changes_nothing(tmp_path: Path) -> None:
    db = tmp_path / "bans.db"
    with closing(sqlite3.connect(db)) as old:
        old.executescript(V1_SCHEMA)
        # a table in the way of the upgrade: ban_events exists with the wrong shape
        old.execute("CREATE TABLE ban_events (x TEXT)")
        old.commit()
    with pytest.raises(sqlite3.OperationalError):
        BanStore(db)
    with closing(sqlite3.connect(db)) as other:
        assert other.execute("PRAGMA user_version").fetchone()[0] == 1
        columns = {row[1] for row in other.execute("PRAGMA table_info(bans)")}
        assert "rule" not in columns
