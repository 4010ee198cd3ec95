"""Batches, minimum prefixes and filters in the service layer (DryRunMaps, FakeClock).

All or nothing: a refused batch leaves the store, its history and the maps
exactly as they were. The same checks run through the real controller and
kernel maps in tests/cli/test_cli_batch.py.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade import protocol
from stockade.clock import FakeClock
from stockade.control_client import batch_lines
from stockade.controller import service as service_module
from stockade.controller.maps import DryRunMaps
from stockade.controller.service import BanService, BatchSession, StagingBudget
from stockade.controller.store import Ban, BanStore
from stockade.protocol import (
    BAD_INPUT,
    MAX_LINE,
    NOT_FOUND,
    RUNTIME,
    CommandError,
    decode_request,
    request,
)
from stockade.targets import Network, PrefixFloor, parse_target

MANAGEMENT = ("198.18.200.0/24",)


def net(text: str) -> Network:
    return parse_target(text)


@dataclass
class World:
    store: BanStore
    maps: DryRunMaps
    clock: FakeClock
    service: BanService

    def snapshot(self) -> tuple[Any, ...]:
        events = self.store._db.execute("SELECT * FROM ban_events ORDER BY id").fetchall()
        return (self.store.bans(), self.store.allows(), events, self.maps.bans())

    @contextmanager
    def unchanged(self, kind: str) -> Iterator[list[CommandError]]:
        """The block must raise a CommandError of `kind` and change nothing."""
        before = self.snapshot()
        caught: list[CommandError] = []
        with pytest.raises(CommandError) as info:
            yield caught
        caught.append(info.value)
        assert info.value.kind == kind, info.value.message
        assert self.snapshot() == before

    def batch(self, entries: list[Any], force: bool = False, chunk: int = 0) -> dict[str, Any]:
        """A whole ban.batch through one session, in chunks of `chunk` entries (0: one)."""
        session = BatchSession()
        size = chunk or max(1, len(entries))
        for start in range(0, max(len(entries) - size, 0), size):
            staged = self.service.ban_batch(session, entries[start : start + size])
            assert staged["status"] == "staged"
        last = entries[(max(len(entries) - 1, 0) // size) * size :]
        return self.service.ban_batch(session, last, commit=True, force=force)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    store = BanStore(tmp_path / "bans.db")
    maps = DryRunMaps()
    clock = FakeClock()
    service = BanService(store, maps, clock, [net(m) for m in MANAGEMENT])
    try:
        yield World(store, maps, clock, service)
    finally:
        store.close()


def entries(count: int, third: int = 0) -> list[dict[str, Any]]:
    """`count` addresses of 198.18.0.0/15, from 198.18.THIRD.1 on."""
    return [{"target": f"198.18.{third + i // 250}.{i % 250 + 1}"} for i in range(count)]


# -- the minimum prefix ---------------------------------------------------------------
@pytest.mark.parametrize("target", ["0.0.0.0/0", "10.0.0.0/7", "::/0", "fd00::/15"])
def test_ban_and_allow_broader_than_the_floor_need_force(world: World, target: str) -> None:
    with world.unchanged(BAD_INPUT) as caught:
        world.service.ban(target)
    assert caught[0].message.startswith(f"refusing to ban {target}: a /")
    assert caught[0].hint == "add --force if you mean it"
    with world.unchanged(BAD_INPUT):
        world.service.allow_add(target)
    with world.unchanged(BAD_INPUT):
        world.batch([{"target": target}])
    assert world.service.ban(target, force=True)["status"] == "added"
    assert net(target) in world.maps.bans()
    assert world.service.allow_add(target, force=True)["status"] == "added"


def test_the_floor_follows_the_config(world: World) -> None:
    world.service.prefix_floor = PrefixFloor(v4=24)
    with world.unchanged(BAD_INPUT):
        world.service.ban("198.18.0.0/23")
    assert world.service.ban("198.18.0.0/24")["status"] == "added"


def test_a_rule_ban_never_forces(world: World) -> None:
    with world.unchanged(BAD_INPUT) as caught:
        world.service.rule_ban("0.0.0.0/0", "10m", "scanner")
    assert "--force" not in (caught[0].hint or "")


def test_a_cluster_ban_broader_than_the_floor_is_not_applied(world: World) -> None:
    before = world.snapshot()
    ban = Ban(net("::/0"), "from another node", "cluster", world.clock.wall(), None)
    assert world.service.apply_remote(ban) is False
    assert world.snapshot() == before


# -- targets that mean something else -------------------------------------------------
def test_a_mapped_target_is_banned_as_ipv4(world: World) -> None:
    result = world.service.ban("::ffff:198.18.0.11")
    assert (result["target"], result["family"]) == ("198.18.0.11", "ipv4")
    assert set(world.maps.bans()) == {net("198.18.0.11")}
    assert world.service.unban("198.18.0.11")["status"] == "removed"
    assert world.store.bans() == [] and world.maps.bans() == {}


def test_a_zone_id_is_bad_input(world: World) -> None:
    with world.unchanged(BAD_INPUT):
        world.service.ban("fd00::12%x")
    with world.unchanged(BAD_INPUT):
        world.service.allow_add("fd00::12%eth0")


# -- batches ----------------------------------------------------------------------------
def test_a_batch_in_chunks(world: World) -> None:
    result = world.batch(entries(1000), chunk=300)
    assert result == {
        "status": "banned",
        "entries": 1000,
        "targets": 1000,
        "added": 1000,
        "updated": 0,
    }
    assert len(world.store.bans()) == 1000 and len(world.maps.bans()) == 1000
    count = world.store._db.execute("SELECT count(*) FROM ban_events").fetchone()[0]
    assert count == 1000  # one history event each
    assert world.service.events[("ban", "cli")] == 1000


def test_a_batch_keeps_ttl_and_reason_and_counts_updates(world: World) -> None:
    world.service.ban("198.18.0.1")
    result = world.batch(
        [
            {"target": "198.18.0.1", "ttl": "1h", "reason": "again"},
            {"target": "198.18.0.2"},
            {"target": "198.18.0.2", "reason": "the later line wins"},
        ]
    )
    assert (result["targets"], result["added"], result["updated"]) == (2, 1, 1)
    bans = {b.target: b for b in world.store.bans()}
    assert bans[net("198.18.0.1")].expires == world.clock.wall() + 3600
    assert bans[net("198.18.0.1")].reason == "again"
    assert bans[net("198.18.0.2")].reason == "the later line wins"


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ({"target": "198.18.0.300"}, "invalid target"),
        ({"target": "fd00::1%x"}, "zone id"),
        ({"target": "198.18.0.9", "ttl": "٣s"}, "invalid duration"),
        ({"target": "198.18.0.9", "ttl": 3}, "ttl must be a string"),
        ({"target": "198.18.0.9", "reason": "x\ny"}, "control characters"),
        ({"target": "198.18.0.9", "colour": "red"}, "unknown field"),
        ({"target": 7}, "target must be a string"),
        ("198.18.0.9", "must be an object"),
        ({"target": "198.18.200.9"}, "management network"),
        ({"target": "192.0.0.0/4"}, "refusing to ban"),
    ],
)
def test_one_bad_entry_refuses_the_whole_batch(world: World, bad: Any, error: str) -> None:
    world.service.ban("198.18.50.1", ttl="1h")
    world.service.allow_add("198.18.60.0/24")
    batch = [*entries(500), bad, *entries(10, 100)]
    with world.unchanged(BAD_INPUT) as caught:
        world.batch(batch, chunk=200)
    refusal = caught[0]
    assert refusal.message.startswith("1 of 511 entries refused, nothing was banned; entry 501")
    assert [r["entry"] for r in refusal.refused] == [501]
    assert error in refusal.refused[0]["error"]
    assert refusal.refused_total == 1


def test_every_refused_entry_is_reported(world: World) -> None:
    world.service.allow_add("198.18.60.0/24")
    batch = [{"target": "198.18.60.5"}, {"target": "nonsense"}, {"target": "198.18.0.1"}]
    with world.unchanged(BAD_INPUT) as caught:
        world.batch(batch, chunk=1)
    assert [(r["entry"], r["target"]) for r in caught[0].refused] == [
        (1, "198.18.60.5"),
        (2, "nonsense"),
    ]
    assert "in the allowlist" in caught[0].refused[0]["error"]
    wire = json.loads(caught[0].to_wire_bytes())
    assert wire["error"]["refused_total"] == 2 and len(wire["error"]["refused"]) == 2


def test_a_full_map_refuses_the_batch(tmp_path: Path) -> None:
    store = BanStore(tmp_path / "bans.db")
    maps = DryRunMaps(capacity=100)
    service = BanService(store, maps, FakeClock())
    try:
        service.ban("198.18.50.1")
        before = (store.bans(), maps.bans())
        with pytest.raises(CommandError) as info:
            service.ban_batch(BatchSession(), entries(100), commit=True)
        assert info.value.kind == RUNTIME and "nothing was banned" in info.value.message
        assert (store.bans(), maps.bans()) == before
    finally:
        store.close()


def test_a_store_error_at_commit_puts_the_maps_back(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.service.ban("198.18.0.1", ttl="1h")
    maps_before = world.maps.bans()

    @contextmanager
    def failing_commit() -> Iterator[None]:
        world.store._db.execute("BEGIN IMMEDIATE")
        yield
        world.store._db.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(world.store, "transaction", failing_commit)
    with pytest.raises(CommandError) as info:
        world.batch([{"target": "198.18.0.1"}, *entries(20, 9)])
    assert info.value.kind == RUNTIME and "ban store error" in info.value.message
    assert world.maps.bans() == maps_before


def test_a_session_stages_one_batch_at_a_time(world: World) -> None:
    session = BatchSession()
    world.service.ban_batch(session, entries(5))
    with world.unchanged(BAD_INPUT) as caught:
        world.service.unban_batch(session, [{"target": "198.18.0.1"}], commit=True)
    assert "while a ban.batch is being staged" in caught[0].message
    assert session.staged is None  # both dropped: the next batch starts afresh
    assert world.service.ban_batch(session, entries(2), commit=True)["targets"] == 2


def test_a_batch_is_bounded(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service_module, "MAX_BATCH", 50)
    session = BatchSession()
    world.service.ban_batch(session, entries(40))
    with world.unchanged(BAD_INPUT) as caught:
        world.service.ban_batch(session, entries(11, 70))
    assert "more than 50 entries" in caught[0].message
    assert session.staged is None


def test_connections_share_one_staging_budget(world: World) -> None:
    budget = StagingBudget(limit=50)
    first, second = BatchSession(budget), BatchSession(budget)
    world.service.ban_batch(first, entries(40))
    with world.unchanged(RUNTIME) as caught:
        world.service.ban_batch(second, entries(20, 10))
    assert "other connections hold 40 staged entries" in caught[0].message
    assert budget.used == 40 and second.staged is None
    first.drop()  # the first connection went away
    assert budget.used == 0
    with pytest.raises(CommandError, match="an earlier chunk of this batch"):
        world.service.ban_batch(second, [], commit=True)  # the refused batch ends
    assert world.service.ban_batch(second, entries(20, 10), commit=True)["targets"] == 20
    assert budget.used == 0  # a commit gives its entries back


def test_after_a_refused_chunk_the_rest_of_its_batch_is_refused(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a client may send every chunk before it reads a reply: none of them may slip in
    monkeypatch.setattr(service_module, "MAX_BATCH", 50)
    session = BatchSession()
    before = world.snapshot()
    world.service.ban_batch(session, entries(40))
    with pytest.raises(CommandError, match="more than 50 entries"):
        world.service.ban_batch(session, entries(20, 10))
    with pytest.raises(CommandError, match=r"more than 50 entries .*an earlier chunk"):
        world.service.ban_batch(session, entries(5, 20))
    with pytest.raises(CommandError, match="an earlier chunk of this batch"):
        world.service.ban_batch(session, entries(5, 30), commit=True)
    assert world.snapshot() == before
    assert world.service.ban_batch(session, entries(5, 40), commit=True)["targets"] == 5


def test_an_abandoned_session_changes_nothing(world: World) -> None:
    before = world.snapshot()
    world.service.ban_batch(BatchSession(), entries(30))  # never committed
    assert world.snapshot() == before


# -- unban: a batch, and all that match ----------------------------------------------
def test_unban_batch_all_or_nothing(world: World) -> None:
    world.batch(entries(50))
    targets = [{"target": e["target"]} for e in entries(50)]
    with world.unchanged(NOT_FOUND) as caught:
        world.service.unban_batch(BatchSession(), [*targets, {"target": "198.18.99.1"}], True)
    assert caught[0].refused == [{"entry": 51, "target": "198.18.99.1", "error": "not banned"}]
    result = world.service.unban_batch(BatchSession(), targets, commit=True)
    assert (result["status"], result["targets"]) == ("removed", 50)
    assert world.store.bans() == [] and world.maps.bans() == {}
    actions = world.store._db.execute("SELECT action, count(*) FROM ban_events GROUP BY action")
    assert dict(actions.fetchall()) == {"ban": 50, "unban": 50}


def test_unban_all_with_filters(world: World) -> None:
    world.service.ban("198.18.0.1", reason="Scanner from report")
    world.service.ban("198.18.0.2", reason="brute force")
    world.service.ban("198.18.0.3", reason="scanner", source="proxy")
    result = world.service.unban_all(source="cli", reason_match="SCANNER")
    assert (result["count"], result["source"], result["reason_match"]) == (1, "cli", "SCANNER")
    assert {str(b.target.network_address) for b in world.store.bans()} == {
        "198.18.0.2",
        "198.18.0.3",
    }
    assert world.service.unban_all(source="proxy")["count"] == 1
    assert set(world.maps.bans()) == {net("198.18.0.2")}


def test_unban_all_without_a_filter_needs_force(world: World) -> None:
    world.batch(entries(20))
    with world.unchanged(BAD_INPUT) as caught:
        world.service.unban_all()
    assert "lifts every ban (20)" in caught[0].message
    assert caught[0].hint == "add --force if you mean it"
    assert world.service.unban_all(force=True)["count"] == 20
    assert world.store.bans() == [] and world.maps.bans() == {}


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"source": "clii"}, "unknown source 'clii'"),
        ({"reason_match": ""}, "must not be empty"),
        ({"reason_match": "a\x1b[2J"}, "control characters"),
    ],
)
def test_unban_all_bad_filters(world: World, kwargs: dict[str, Any], error: str) -> None:
    world.service.ban("198.18.0.1")
    with world.unchanged(BAD_INPUT) as caught:
        world.service.unban_all(**kwargs)
    assert error in caught[0].message


def test_bans_filtered(world: World) -> None:
    world.service.ban("198.18.0.1", reason="Scanner")
    world.service.ban("198.18.4.0/24", reason="botnet")
    world.service.ban("fd00::7", reason="scanner", source="proxy")
    listed = world.service.list_bans_filtered
    assert [b["target"] for b in listed(text="scanner")] == ["198.18.0.1", "fd00::7"]
    assert [b["target"] for b in listed(text="198.18.4.")] == ["198.18.4.0/24"]
    assert [b["target"] for b in listed(source="proxy")] == ["fd00::7"]
    assert [b["target"] for b in listed(source="cli", text="SCAN")] == ["198.18.0.1"]
    assert listed(source="rule") == []
    with pytest.raises(CommandError, match="unknown source"):
        listed(source="nobody")


# -- the wire: a batch fits the line limit whatever its entries --------------------------
REASONS = st.text(st.characters(codec="utf-8", exclude_categories=("C",)), max_size=200)


@given(
    st.lists(st.tuples(st.ip_addresses(), REASONS), min_size=1, max_size=400),
    st.sampled_from([{}, {"force": True}, {"force": None}]),
)
def test_batch_lines_stay_under_the_line_limit(
    items: list[tuple[Any, str]], args: dict[str, Any]
) -> None:
    batch = [{"target": str(address), "ttl": "7d", "reason": r} for address, r in items]
    lines = batch_lines("ban.batch", batch, **args)
    sent: list[Any] = []
    for number, (count, line) in enumerate(lines, 1):
        assert len(line) <= MAX_LINE and line.endswith(b"\n") and line.count(b"\n") == 1
        spec, decoded = decode_request(line)  # what the controller reads
        assert spec.name == "ban.batch"
        last = number == len(lines)
        expected = {k: v for k, v in args.items() if v is not None} | {"commit": True}
        assert {k: v for k, v in decoded.items() if k != "entries"} == (expected if last else {})
        sent += decoded["entries"]
        assert count == len(sent)
    assert sent == batch  # every entry once, in order


def test_an_entry_too_long_for_a_line_is_bad_input() -> None:
    with pytest.raises(CommandError) as info:
        batch_lines("ban.batch", [{"target": "198.18.0.1"}, {"target": "x" * MAX_LINE}])
    assert info.value.kind == BAD_INPUT and "entry 2 is too long" in info.value.message


def test_dispatch_keeps_a_batch_per_session(tmp_path: Path) -> None:
    from stockade.config import Config
    from stockade.controller.daemon import Controller

    ctl = Controller(Config())
    store = BanStore(tmp_path / "bans.db")
    try:
        ctl.store = store
        ctl.service = BanService(store, DryRunMaps(), FakeClock())
        session, other = BatchSession(), BatchSession()
        first = request("ban.batch", entries=entries(3))
        assert ctl.dispatch(first, None, session)["result"]["staged"] == 3
        assert ctl.dispatch(first, None, other)["result"]["staged"] == 3
        last = request("ban.batch", entries=entries(2, 9), commit=True)
        assert ctl.dispatch(last, None, session)["result"]["targets"] == 5
        bad = request("ban.batch", entries=entries(1), commit="yes")
        reply = ctl.dispatch(bad, None, other)
        assert reply["error"]["message"] == "ban.batch: commit must be true or false"
        assert ctl.dispatch(request("ban.batch", entries={}), None)["error"]["kind"] == BAD_INPUT
        assert protocol.COMMANDS_BY_NAME["ban.batch"].cli == "ban"
        assert len(store.bans()) == 5
    finally:
        ctl.close()
        store.close()
