"""The cluster's trust model against a real Redis: what a Redis writer without the key can
and cannot do to the nodes (dry-run maps stand in for the kernel; each refusal must leave
them exactly as they were)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from cluster_nodes import Node, cluster_key, wait_for, write_key

from stockade.cluster_settings import ClusterAccept, ClusterAuth
from stockade.controller.cluster import ClusterSync
from stockade.controller.cluster_auth import ClusterKey, load_key, new_nonce, sign
from stockade.controller.cluster_records import TOMBSTONE_TTL_MS, Change, Keys, encode_ban
from stockade.controller.store import Ban
from stockade.lab.redis_server import RedisServer
from stockade.targets import parse_target

X, Y, Z = "198.18.7.1", "198.18.7.2", "198.18.7.3"
KEYS = Keys("stockade:")
PREFIX = "stockade:"


def sync_of(node: Node) -> ClusterSync:
    assert node.sync is not None
    return node.sync


def direct(server: RedisServer) -> redis.Redis:
    return redis.Redis(
        unix_socket_path=str(server.socket_path), password=server.password, decode_responses=True
    )


def run(nodes: list[Node], body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        try:
            for node in nodes:
                await node.start()
            # resynced and reading from the head: what the test writes next is an event
            await wait_for(lambda: all(sync_of(n).state == "connected" for n in nodes), 3.0)
            await body()
        finally:
            for node in nodes:
                await node.stop()

    try:
        asyncio.run(main())
    finally:
        for node in nodes:
            node.close()


def refused(node: Node) -> dict[str, dict[str, int]]:
    result: dict[str, dict[str, int]] = sync_of(node).status()["refused"]
    return result


def ban_record(target: str, origin: str = "mallory", **fields: Any) -> str:
    now = time.time()
    ban = Ban(
        parse_target(target),
        fields.pop("reason", "forged"),
        fields.pop("source", "cli"),
        fields.pop("created", now),
        fields.pop("expires", now + 3600),
    )
    return encode_ban(ban, origin)


def change(
    action: str,
    target: str,
    node: str = "mallory",
    key: ClusterKey | None = None,
    at: float | None = None,
    record: str | None = None,
) -> Change:
    """A change as a publisher makes it, signed with `key` when given."""
    if record is None:
        record = ban_record(target, node) if action == "ban" else ""
    made = Change(
        node, action, target, f"{time.time() if at is None else at:.6f}", new_nonce(), record, None
    )
    if key is None:
        return made
    return dataclasses.replace(made, signature=sign(key, made.signed(PREFIX)))


def xadd(client: redis.Redis, made: Change) -> str:
    """Straight into the stream, as anyone with the Redis password can."""
    fields = {"a": made.action, "t": made.target, "n": made.node, "r": made.record, "at": made.at}
    if made.nonce:
        fields["nc"] = made.nonce
    if made.signature is not None:
        fields["sig"] = made.signature
    return str(client.xadd(KEYS.stream, fields))


def plant(client: redis.Redis, made: Change) -> None:
    """Into the durable record and its index, as a joining node reads them."""
    client.set(KEYS.ban(made.target), made.stored_value())
    client.zadd(KEYS.index, {made.target: "+inf"})


async def refused_once_more(node: Node, kind: str, reason: str, before: int) -> None:
    await wait_for(lambda: refused(node).get(kind, {}).get(reason, 0) > before, 3.0)


# -- forged events -------------------------------------------------------------------


def test_forged_events_are_refused_counted_and_change_no_map(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key = load_key(cluster_key(tmp_path), "test")
    other_key = load_key(write_key(tmp_path / "other.key"), "test")
    auth = ClusterAuth(key_file=cluster_key(tmp_path), nodes=("a", "b"))
    a = Node(tmp_path, "a", redis_server.url(), auth=auth)
    b = Node(tmp_path, "b", redis_server.url(), auth=auth)
    client = direct(redis_server)

    async def body() -> None:
        await a.ban(Z, "1h")  # a real ban from a, which b holds
        await wait_for(lambda: b.banned(Z), 2.0)
        maps = b.maps.bans()
        forged = [
            ("unsigned", change("ban", X, node="a")),
            ("unknown_key", change("ban", X, node="a", key=other_key)),
            (
                "bad_tag",  # signed for X, then pointed at Y
                dataclasses.replace(
                    change("ban", X, node="a", key=key), target=Y, record=ban_record(Y, "a")
                ),
            ),
            ("unknown_node", change("ban", X, node="mallory", key=key, record=ban_record(X, "a"))),
            ("unknown_node", change("ban", X, node="a", key=key, record=ban_record(X, "mallory"))),
            ("invalid", change("ban", "0.0.0.0/0", node="a", key=key)),  # a valid tag, a /0
            ("invalid", change("ban", "::/0", node="a", key=key)),
            ("unsigned", change("unban", Z, node="a")),
            ("bad_tag", dataclasses.replace(change("unban", X, node="a", key=key), target=Z)),
        ]
        for reason, made in forged:
            before = refused(b).get("event", {}).get(reason, 0)
            xadd(client, made)
            await refused_once_more(b, "event", reason, before)
            assert b.maps.bans() == maps, reason  # the kernel's bans did not move
        assert b.banned(Z) and not b.banned(X) and not b.banned(Y)
        assert refused(b)["event"] == {
            "unsigned": 2,
            "unknown_key": 1,
            "bad_tag": 2,
            "unknown_node": 2,
            "invalid": 2,
        }
        # a skips what claims to come from itself, and refuses the rest as b does
        assert not a.banned(X) and a.banned(Z)
        assert refused(a)["event"]["unknown_node"] == 1  # the one a did not take as its own
        await a.unban(Z)  # and the genuine article still works
        await wait_for(lambda: not b.banned(Z), 2.0)

    run([a, b], body)


def test_an_unban_is_refused_where_unbans_from_others_are_not_accepted(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = redis_server.url()
    a = Node(tmp_path, "a", url)
    b = Node(tmp_path, "b", url, accept=ClusterAccept(unbans="none"))
    c = Node(tmp_path, "c", url, accept=ClusterAccept(unbans="received"))

    async def body() -> None:
        await a.ban(X, "1h")
        await c.ban(Y, "1h")  # c's own CLI ban
        await wait_for(lambda: all(n.banned(X) and n.banned(Y) for n in (a, b, c)), 2.0)
        await a.unban(X)  # validly signed, by a node in the cluster
        await wait_for(lambda: not c.banned(X), 2.0)  # c: X came from the cluster, lifted
        await refused_once_more(b, "event", "not_accepted", 0)
        assert b.banned(X)  # b takes no unbans from others
        await a.unban(Y)  # would lift c's own ban: c only lifts what it received
        await refused_once_more(c, "event", "not_accepted", 0)
        await wait_for(lambda: not a.banned(Y), 1.0)
        assert c.banned(Y) and b.banned(Y)
        assert c.store.get_ban(parse_target(Y)).source == "cli"  # type: ignore[union-attr]

    run([a, b, c], body)


def test_replayed_and_stale_events_are_refused(tmp_path: Path, redis_server: RedisServer) -> None:
    key = load_key(cluster_key(tmp_path), "test")
    a = Node(tmp_path, "a", redis_server.url())
    b = Node(tmp_path, "b", redis_server.url())
    client = direct(redis_server)

    async def body() -> None:
        await a.ban(X, "1h")
        await wait_for(lambda: b.banned(X), 2.0)
        await a.unban(X)
        await wait_for(lambda: not b.banned(X), 2.0)
        (entry,) = client.xrevrange(KEYS.stream, count=1)
        unban = entry[1]
        assert unban["a"] == "unban" and unban["sig"]
        await a.ban(X, "1h")  # banned again
        await wait_for(lambda: b.banned(X), 2.0)
        client.xadd(KEYS.stream, unban)  # the old unban, copied back in: its nonce was seen
        await refused_once_more(b, "event", "replayed", 0)
        assert b.banned(X)
        # an old unban (signed two minutes ago, never seen): outside the replay window
        old = change("unban", X, node="a", key=key, at=time.time() - 120)
        xadd(client, old)
        await refused_once_more(b, "event", "replayed", 1)
        old_ban = change("ban", Y, node="a", key=key, at=time.time() - 120)  # a ban, likewise
        xadd(client, old_ban)
        await refused_once_more(b, "event", "replayed", 2)
        assert not b.banned(Y)
        # a fresh signature, but signed before the ban it would lift was made
        ban = b.store.get_ban(parse_target(X))
        assert ban is not None
        stale = change("unban", X, node="a", key=key, at=ban.created - 10)
        xadd(client, stale)
        await refused_once_more(b, "event", "replayed", 3)
        assert b.banned(X) and a.banned(X)

    run([a, b], body)


def test_refusals_are_logged_once_per_origin(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    b = Node(tmp_path, "b", redis_server.url())
    client = direct(redis_server)

    async def body() -> None:
        await wait_for(lambda: sync_of(b).state == "connected", 3.0)  # reading from the head
        for i in range(20):
            xadd(client, change("ban", f"198.18.9.{i}", node="mallory"))
        xadd(client, change("ban", X, node="eve"))
        await wait_for(lambda: refused(b).get("event", {}).get("unsigned", 0) == 21, 3.0)

    with caplog.at_level(logging.WARNING, logger="stockade.controller.cluster"):
        run([b], body)
    lines = [r.getMessage() for r in caplog.records if "refused an event" in r.getMessage()]
    assert len(lines) == 2, lines
    assert "from mallory (unsigned)" in lines[0] and "from eve (unsigned)" in lines[1]
    assert not b.maps.bans()


# -- forged records: what a joining node reads ------------------------------------------


def test_a_joining_node_applies_only_authentic_records(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key = load_key(cluster_key(tmp_path), "test")
    client = direct(redis_server)
    a = Node(tmp_path, "a", redis_server.url())

    async def first() -> None:
        await a.ban(X, "1h")
        await wait_for(lambda: sync_of(a).published >= 1 and not sync_of(a).pending, 2.0)

    run([a], first)
    plant(client, change("ban", Y, node="a"))  # unsigned
    plant(client, change("ban", "0.0.0.0/1", node="a", key=key))  # signed, too broad
    forged = change("ban", Z, node="a", key=key)
    plant(client, dataclasses.replace(forged, record=ban_record(Z, "a", reason="changed")))
    joining = Node(tmp_path, "d", redis_server.url())

    async def body() -> None:
        await wait_for(lambda: sync_of(joining).state == "connected", 3.0)
        assert joining.banned(X)
        assert set(joining.maps.bans()) == {parse_target(X)}
        assert refused(joining)["record"] == {"unsigned": 1, "invalid": 1, "bad_tag": 1}

    run([joining], body)


# -- key rotation --------------------------------------------------------------------


def test_key_rotation_in_three_steps_loses_nothing(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    old = write_key(tmp_path / "old.key")
    new = write_key(tmp_path / "new.key")
    url = redis_server.url()
    start = ClusterAuth(key_file=old)
    a = Node(tmp_path, "a", url, auth=start)
    b = Node(tmp_path, "b", url, auth=start)
    c = Node(tmp_path, "c", url, auth=start)

    def rotate(node: Node, auth: ClusterAuth) -> None:
        """What `stockade reload` does with a new [cluster.auth]."""
        from stockade.controller.cluster_auth import trust_from_config

        node.config = dataclasses.replace(node.config, auth=auth)
        sync_of(node).set_trust(trust_from_config(node.config))

    async def body() -> None:
        await wait_for(lambda: all(sync_of(n).state == "connected" for n in (a, b, c)), 3.0)
        # step 1: every node accepts the new key, still signs with the old one
        for node in (a, b):
            rotate(node, ClusterAuth(key_file=old, accept_key_files=(new,)))
        # step 2, half done: a signs with the new key, b still with the old one
        rotate(a, ClusterAuth(key_file=new, accept_key_files=(old,)))
        assert sync_of(a).status()["auth"]["key_id"] != sync_of(b).status()["auth"]["key_id"]
        await a.ban(X, "1h")
        await b.ban(Y, "1h")
        await wait_for(lambda: b.banned(X) and a.banned(Y), 2.0)
        # c skipped step 1: it holds only the old key, so a's new signature is refused
        await refused_once_more(c, "event", "unknown_key", 0)
        assert not c.banned(X) and c.banned(Y)
        # step 2 done, then step 3: the old key goes
        rotate(b, ClusterAuth(key_file=new, accept_key_files=(old,)))
        for node in (a, b):
            rotate(node, ClusterAuth(key_file=new))
        await c.ban(Z, "1h")  # signed with the old key, no longer accepted
        await refused_once_more(a, "event", "unknown_key", 0)
        await b.unban(X)
        await wait_for(lambda: not a.banned(X), 2.0)
        assert not a.banned(Z) and not b.banned(Z)
        assert "bad_tag" not in refused(a).get("event", {})

    run([a, b, c], body)


# -- the shared record lost while connected -----------------------------------------------


def test_flushall_on_a_live_redis_is_detected_and_the_record_rebuilt(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = redis_server.url()
    a, b = Node(tmp_path, "a", url), Node(tmp_path, "b", url)
    client = direct(redis_server)

    async def body() -> None:
        await a.ban(X, "1h")
        await b.ban(Y)
        await a.run(lambda: a.service.rule_ban(Z, "10m", "scanner", None, {"hits": 3}))
        await wait_for(lambda: all(n.banned(t) for n in (a, b) for t in (X, Y, Z)), 2.0)
        client.flushall()  # nobody reconnects: both connections stay up
        took = await wait_for(lambda: set(client.zrange(KEYS.index, 0, -1)) == {X, Y, Z}, 3.0)
        assert took < 2.0  # heartbeat 0.2s here: found on the next beat (0.2s measured)
        # each node finds it on its own heartbeat (one may find the epoch the other re-made)
        await wait_for(lambda: all(sync_of(n).status()["record_losses"] == 1 for n in (a, b)), 1.0)
        joining = Node(tmp_path, "c", url)  # a node that joins now gets every ban
        try:
            await joining.start()
            await wait_for(lambda: all(joining.banned(t) for t in (X, Y, Z)), 2.0)
            (ban,) = joining.service.explain(Z)["bans"]
            assert ban["rule"] == "scanner" and ban["details"]["cluster"]["node"] == "a"
        finally:
            await joining.stop()
            joining.close()

    run([a, b], body)


# -- unbans a node missed: only a signed one lifts ----------------------------------------


def test_a_missed_unban_lifts_only_when_signed(tmp_path: Path, redis_server: RedisServer) -> None:
    url = redis_server.url()
    a, b = Node(tmp_path, "a", url), Node(tmp_path, "b", url)
    client = direct(redis_server)

    async def body() -> None:
        await a.ban(X, "1h")
        await a.ban(Y, "1h")
        await wait_for(lambda: b.banned(X) and b.banned(Y), 2.0)
        await b.stop()
        await a.unban(X)  # b misses it; the stream is then lost (trimmed, say)
        await wait_for(lambda: '"a":"unban"' in (client.get(KEYS.ban(X)) or ""), 2.0)
        client.delete(KEYS.stream)
        client.delete(KEYS.ban(Y))  # and someone deletes Y from the record, unsigned
        client.zrem(KEYS.index, Y)
        await b.start()
        await wait_for(lambda: not b.banned(X), 2.0)  # the signed tombstone lifted X
        await asyncio.sleep(0.3)
        assert b.banned(Y)  # absence alone proves nothing: kept
        assert sync_of(b).status()["kept_unconfirmed"] == 1
        assert client.pttl(KEYS.ban(X)) <= TOMBSTONE_TTL_MS

    run([a, b], body)


# -- a rollout: nodes with and without the key ----------------------------------------


def test_migration_accepts_unsigned_only_when_told(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = redis_server.url()
    key = cluster_key(tmp_path)
    legacy = Node(tmp_path, "old", url, auth=ClusterAuth(insecure_unauthenticated=True))
    migrating = Node(tmp_path, "m", url, auth=ClusterAuth(key_file=key, accept_unsigned=True))
    strict = Node(tmp_path, "s", url, auth=ClusterAuth(key_file=key))

    async def body() -> None:
        await legacy.ban(X, "1h")  # unsigned
        await wait_for(lambda: migrating.banned(X), 2.0)
        await refused_once_more(strict, "event", "unsigned", 0)
        assert not strict.banned(X)
        assert sync_of(migrating).status()["unsigned_accepted"] >= 1
        assert sync_of(migrating).status()["auth"]["mode"] == "migration"
        await migrating.ban(Y, "1h")  # signed: the node without a key applies it unchecked
        await wait_for(lambda: legacy.banned(Y) and strict.banned(Y), 2.0)
        # a forged peer in the heartbeat hash is not shown by a node that checks
        direct(redis_server).hset(KEYS.nodes, "ghost", json.dumps({"at": time.time()}))
        await refused_once_more(strict, "heartbeat", "unsigned", 0)
        assert "ghost" not in [p["node"] for p in sync_of(strict).status()["peers"]]

    run([legacy, migrating, strict], body)


def test_received_bans_get_the_local_checks_and_the_accept_policy(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    url = redis_server.url()
    a = Node(tmp_path, "a", url)
    b = Node(tmp_path, "b", url)
    rules_only = Node(tmp_path, "c", url, accept=ClusterAccept(bans=("rule",)))

    async def body() -> None:
        await b.run(lambda: b.service.allow_add("198.18.7.0/24", "our office"))
        await a.ban(X, "1h")  # inside b's allowlist: refused there, as a local ban would be
        await refused_once_more(b, "event", "allowlisted", 0)
        await refused_once_more(rules_only, "event", "not_accepted", 0)  # a cli ban
        assert not b.banned(X) and not rules_only.banned(X)
        await a.run(lambda: a.service.rule_ban(Z, "10m", "scanner"))
        await wait_for(lambda: rules_only.banned(Z), 2.0)  # a rule ban: accepted
        await a.run(lambda: a.service.rule_ban("198.51.100.9", "10m", "scanner", "x" * 200))
        await wait_for(lambda: rules_only.banned("198.51.100.9"), 2.0)

    run([a, b, rules_only], body)
