"""The SQLite ban store: the truth the maps follow."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from stockade.controller.store import SCHEMA_VERSION, Allow, Ban, BanStore
from stockade.targets import parse_target

T0 = 1_800_000_000.0


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "state" / "bans.db"


@pytest.fixture
def store(db: Path) -> Iterator[BanStore]:
    s = BanStore(db)
    try:
        yield s
    finally:
        s.close()


def ban(target: str, expires: float | None = None, reason: str = "r", created: float = T0) -> Ban:
    return Ban(parse_target(target), reason, "cli", created, expires)


def test_creates_its_directory_private(db: Path, store: BanStore) -> None:
    assert db.exists()
    assert db.parent.stat().st_mode & 0o777 == 0o700


def test_wal_mode_is_on(db: Path, store: BanStore) -> None:
    with closing(sqlite3.connect(db)) as other:
        assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert other.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_put_get(store: BanStore) -> None:
    b = ban("198.18.0.7", expires=T0 + 60)
    store.put_ban(b)
    assert store.get_ban(parse_target("198.18.0.7")) == b
    assert store.get_ban(parse_target("198.18.0.7/32")) == b
    assert store.get_ban(parse_target("198.18.0.8")) is None
    assert store.bans() == [b]


def test_v6_and_prefixes(store: BanStore) -> None:
    bans = [
        ban("fd00::7"),
        ban("fd00:1::/64", created=T0 + 1),
        ban("198.18.4.0/24", created=T0 + 2),
    ]
    for b in bans:
        store.put_ban(b)
    assert store.bans() == bans  # ordered by creation


def test_update_replaces_in_place(store: BanStore) -> None:
    store.put_ban(ban("198.18.0.7", expires=T0 + 60, reason="first"))
    updated = ban("198.18.0.7/32", expires=None, reason="second", created=T0 + 5)
    store.put_ban(updated)
    assert store.bans() == [updated]


def test_delete(store: BanStore) -> None:
    store.put_ban(ban("198.18.0.7"))
    assert store.delete_ban(parse_target("198.18.0.7")) is True
    assert store.delete_ban(parse_target("198.18.0.7")) is False
    assert store.bans() == []


def test_expired(store: BanStore) -> None:
    past = ban("198.18.0.1", expires=T0 - 1)
    edge = ban("198.18.0.2", expires=T0)
    future = ban("198.18.0.3", expires=T0 + 1)
    forever = ban("198.18.0.4", expires=None)
    for b in (past, edge, future, forever):
        store.put_ban(b)
    assert {b.target for b in store.expired_bans(T0)} == {past.target, edge.target}
    assert not edge.active(T0)
    assert future.active(T0)
    assert forever.active(T0 + 10**9)


def test_allows(store: BanStore) -> None:
    a = Allow(parse_target("198.18.9.0/24"), "office", T0)
    store.put_allow(a)
    store.put_allow(Allow(parse_target("198.18.9.0/24"), "office v2", T0 + 10))
    assert store.allows() == [Allow(a.target, "office v2", T0)]  # created is kept
    assert store.delete_allow(a.target) is True
    assert store.delete_allow(a.target) is False
    assert store.allows() == []


def test_transaction_rolls_back_on_error(store: BanStore) -> None:
    store.put_ban(ban("198.18.0.1"))
    with pytest.raises(RuntimeError), store.transaction():
        store.put_ban(ban("198.18.0.2"))
        store.delete_ban(parse_target("198.18.0.1"))
        raise RuntimeError("boom")
    assert [b.target for b in store.bans()] == [parse_target("198.18.0.1")]


def test_persists_across_reopen(db: Path) -> None:
    first = BanStore(db)
    b = ban("198.18.0.7", expires=T0 + 3600, reason="scanner")
    a = Allow(parse_target("fd00::/64"), "lab", T0)
    with first.transaction():
        first.put_ban(b)
        first.put_allow(a)
    first.close()
    second = BanStore(db)
    try:
        assert second.bans() == [b]
        assert second.allows() == [a]
    finally:
        second.close()


def test_refuses_a_newer_schema(db: Path) -> None:
    BanStore(db).close()
    with closing(sqlite3.connect(db)) as other:
        other.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
        other.commit()
    with pytest.raises(RuntimeError, match="newer stockade"):
        BanStore(db)
