"""Bans shared through a real Redis by three controller-side nodes (dry-run maps, no kernel).

The kernel path (XDP drops on three gateways) is in tests/integration/test_cluster_lab.py.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import redis
from cluster_nodes import Node, wait_for

from stockade.controller.cluster import ClusterSync
from stockade.controller.cluster_records import Keys
from stockade.lab.redis_server import RedisServer
from stockade.redis_conn import ClusterAuthError
from stockade.targets import parse_target

X, Y, Z = "198.18.7.1", "198.18.7.2", "198.18.7.3"


def run_nodes(
    tmp: Path, url: str, body: Callable[[list[Node]], Awaitable[None]], count: int = 3
) -> None:
    names = ("a", "b", "c")[:count] if count > 1 else ("b",)
    nodes = [Node(tmp, name, url) for name in names]

    async def main() -> None:
        try:
            for node in nodes:
                await node.start()
            await body(nodes)
        finally:
            for node in nodes:
                await node.stop()

    try:
        asyncio.run(main())
    finally:
        for node in nodes:
            node.close()


def sync_of(node: Node) -> ClusterSync:
    assert node.sync is not None
    return node.sync


def direct(server: RedisServer) -> redis.Redis:
    return redis.Redis(unix_socket_path=str(server.socket_path), password=server.password)


def test_ban_and_unban_reach_every_node_once(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body(nodes: list[Node]) -> None:
        a, b, c = nodes
        await a.ban(X, "1h")
        took = await wait_for(lambda: b.banned(X) and c.banned(X), 1.0)
        assert took < 1.0
        received = b.store.get_ban(parse_target(X))
        assert received is not None and received.source == "cluster"
        assert received.reason == "test (from a, cli)"
        details = b.service.explain(X)["bans"][0]["details"]
        assert details["cluster"] == {"node": "a", "source": "cli", "reason": "test"}
        original = a.store.get_ban(parse_target(X))
        assert original is not None and original.source == "cli"  # the setter keeps its own
        assert received.expires == original.expires

        await c.unban(X)  # lifted on another node than the one that set it
        await wait_for(lambda: not a.banned(X) and not b.banned(X), 1.0)
        assert a.store.get_ban(parse_target(X)) is None
        await asyncio.sleep(0.3)  # nothing echoes: one event per change, ever
        assert [sync_of(n).published for n in nodes] == [1, 0, 1]
        assert direct(redis_server).xlen(Keys("stockade:").stream) == 2
        keys = Keys("stockade:")
        tombstone = json.loads(direct(redis_server).get(keys.ban(X)))  # a signed unban, kept
        assert tombstone["envelope"]["a"] == "unban" and tombstone["envelope"]["n"] == "c"
        assert direct(redis_server).pttl(keys.ban(X)) > 0
        assert direct(redis_server).zscore(keys.index, X) is None

    run_nodes(tmp_path, redis_server.url(), body)


def test_rule_ban_keeps_rule_and_details_on_other_nodes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def body(nodes: list[Node]) -> None:
        a, b = nodes
        await a.run(lambda: a.service.rule_ban(X, "10m", "scanner", None, {"hits": 31}))
        await wait_for(lambda: b.banned(X), 1.0)
        (ban,) = b.service.explain(X)["bans"]
        assert ban["source"] == "cluster" and ban["rule"] == "scanner"
        assert ban["details"]["hits"] == 31 and ban["details"]["cluster"]["source"] == "rule"

    run_nodes(tmp_path, redis_server.url(), body, count=2)


def test_ttl_expiry_holds_everywhere(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body(nodes: list[Node]) -> None:
        a, b, c = nodes
        await a.ban(X, "1s")
        await wait_for(lambda: b.banned(X) and c.banned(X), 1.0)
        expiries = {n.store.get_ban(parse_target(X)).expires for n in nodes}  # type: ignore[union-attr]
        assert len(expiries) == 1
        await asyncio.sleep(1.1)
        for node in nodes:
            await node.run(node.service.sweep)
            assert not node.banned(X) and node.store.get_ban(parse_target(X)) is None
        assert not direct(redis_server).exists(Keys("stockade:").ban(X))  # Redis expired it

    run_nodes(tmp_path, redis_server.url(), body)


def test_a_node_that_was_down_catches_up(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body(nodes: list[Node]) -> None:
        a, b, c = nodes
        await a.ban(Z)
        await wait_for(lambda: b.banned(Z), 1.0)
        await b.stop()  # B away (its saved position and queue stay in its state dir)
        saved = json.loads((b.home / "cluster.json").read_text())
        assert saved["last_id"]
        await a.ban(X, "1h")
        await c.ban(Y)
        await a.unban(Z)
        await asyncio.sleep(0.1)
        assert not b.banned(X) and b.banned(Z)
        await b.start()
        await wait_for(lambda: b.banned(X) and b.banned(Y) and not b.banned(Z), 2.0)
        await wait_for(lambda: sync_of(b).received >= 3, 1.0)  # from the stream, not a resync

    run_nodes(tmp_path, redis_server.url(), body)


def test_redis_killed_and_restarted_while_bans_are_made_loses_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def body(nodes: list[Node]) -> None:
        a, b, c = nodes
        await a.ban(X)
        await wait_for(lambda: b.banned(X) and c.banned(X), 1.0)
        redis_server.kill()
        await wait_for(lambda: sync_of(a).state == "degraded", 3.0)
        await a.ban(Y)  # queued while Redis is away
        await b.ban(Z, "1h")
        assert sync_of(a).status()["queued"] == 1 and a.banned(Y)  # enforced here already
        await asyncio.sleep(0.3)
        redis_server.start()  # empty: started without persistence
        everywhere = [X, Y, Z]
        await wait_for(lambda: all(n.banned(t) for n in nodes for t in everywhere), 5.0)
        await wait_for(lambda: all(sync_of(n).state == "connected" for n in nodes), 2.0)
        assert sync_of(a).status()["queued"] == 0
        index = direct(redis_server).zrange(Keys("stockade:").index, 0, -1)
        assert sorted(t.decode() for t in index) == sorted(everywhere)  # the record is whole

    run_nodes(tmp_path, redis_server.url(), body)


def test_a_node_that_boots_without_redis_enforces_and_replays_its_queue_later(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def body(nodes: list[Node]) -> None:
        (b,) = nodes
        lone = Node(tmp_path, "d", "unix:///nonexistent/redis.sock")
        try:
            await lone.start()  # Redis unreachable: it boots and enforces anyway
            assert sync_of(lone).state == "degraded"
            await lone.ban(X)
            assert lone.banned(X) and sync_of(lone).status()["queued"] == 1
            await lone.stop()
        finally:
            lone.close()
        state = json.loads((tmp_path / "d" / "cluster.json").read_text())
        assert [e["target"] for e in state["pending"]] == [X]  # the queue outlived the process
        assert not b.banned(X)
        back = Node(tmp_path, "d", redis_server.url())  # restarted, Redis reachable now
        try:
            await back.start()
            await wait_for(lambda: b.banned(X), 1.0)
            await wait_for(lambda: sync_of(back).status()["queued"] == 0, 1.0)
            await back.stop()
        finally:
            back.close()

    run_nodes(tmp_path, redis_server.url(), body, count=1)


def test_status_shows_peers_sync_and_lag(tmp_path: Path, redis_server: RedisServer) -> None:
    async def body(nodes: list[Node]) -> None:
        a, _b, c = nodes
        await asyncio.sleep(0.5)  # a couple of heartbeats
        await a.ban(X)
        await wait_for(lambda: c.banned(X) and sync_of(c).received == 1, 1.0)
        status = sync_of(c).status()
        assert status["backend"] == "redis" and status["node"] == "c"
        assert status["state"] == "connected" and status["last_error"] is None
        assert [p["node"] for p in status["peers"]] == ["a", "b"]
        assert all(p["alive"] for p in status["peers"])
        assert time.time() - status["last_sync"] < 2.0
        assert 0 <= status["lag"] < 1.0
        assert status["received"] == 1 and status["queued"] == 0
        assert "***" in status["url"] and "cluster-test-secret" not in status["url"]

    run_nodes(tmp_path, redis_server.url(tcp=True), body)


def test_wrong_password_is_a_clear_startup_error(tmp_path: Path, redis_server: RedisServer) -> None:
    node = Node(tmp_path, "a", redis_server.url(password="not-the-password"))
    try:
        with pytest.raises(ClusterAuthError, match="refused the password"):
            asyncio.run(node.start())
    finally:
        node.close()


def test_controller_metrics_say_the_node_is_degraded() -> None:
    from stockade.controller import metrics
    from stockade.controller.cluster import embedded_status

    def snapshot(cluster: dict[str, object] | None) -> metrics.Snapshot:
        return metrics.Snapshot({}, {}, 0, {}, 0, 0, False, [], cluster)

    degraded = {
        **embedded_status("a"),
        "backend": "redis",
        "state": "degraded",
        "queued": 4,
        "peers": [{"node": "b", "alive": True}, {"node": "c", "alive": False}],
        "lag": 0.012,
        "last_sync": 1_800_000_000.0,
        "published": 7,
    }
    text = metrics.render(lambda: snapshot(degraded)).decode()
    assert "stockade_cluster_degraded 1.0" in text
    assert "stockade_cluster_queued_events 4.0" in text
    assert "stockade_cluster_peers 1.0" in text
    assert "stockade_cluster_lag_seconds 0.012" in text
    assert 'stockade_cluster_events_total{direction="published"} 7.0' in text
    connected = metrics.render(lambda: snapshot({**degraded, "state": "connected"})).decode()
    assert "stockade_cluster_degraded 0.0" in connected
    assert "stockade_cluster" not in metrics.render(lambda: snapshot(None)).decode()
