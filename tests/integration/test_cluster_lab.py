"""Cluster mode with the kernel: three gateways (one lab each), one Redis, real XDP drops.

A ban on node A must drop the source on B and C; unbans, TTL expiry, a node
restarted while bans were made, and a Redis killed and restarted while bans
were made must all end with every gateway agreeing.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import time
import tomllib
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import redis
from cluster_lab_nodes import Node, cluster_of_three, write_cluster_key
from controller_harness import can_ping, restart, stop

from stockade.controller.cluster_auth import ClusterKey, load_key, new_nonce, sign
from stockade.controller.cluster_records import Change, Keys, encode_ban
from stockade.controller.store import Ban
from stockade.lab import topology
from stockade.lab.redis_server import RedisServer, running_redis
from stockade.targets import parse_target

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

C1, C2, C3, C4 = topology.CLIENT_V4


def free_prefix(index: int) -> str:
    """A test-lab prefix (swept by the integration conftest if this run dies)."""
    for tail in range(90 - 10 * index, 100 - 10 * index):
        prefix = f"st{os.getpid() % 10000:04d}{tail:02d}"
        if topology.prefix_in_use(prefix) is None:
            return prefix
    raise RuntimeError("no free lab prefix")


@pytest.fixture(scope="module")
def redis_for_labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with running_redis(tmp_path_factory.mktemp("redis"), "lab-cluster-secret") as server:
        yield server


@pytest.fixture(scope="module")
def nodes(
    tmp_path_factory: pytest.TempPathFactory, redis_for_labs: RedisServer
) -> Iterator[list[Node]]:
    with ExitStack() as stack:
        labs = []
        for i in range(3):
            prefix = free_prefix(i)
            hook = functools.partial(topology.down, prefix)
            atexit.register(hook)
            stack.callback(atexit.unregister, hook)
            labs.append(stack.enter_context(topology.running_lab(prefix, start_upstream=False)))
        tmp = tmp_path_factory.mktemp("cluster")
        yield stack.enter_context(cluster_of_three(tmp, labs, redis_for_labs))


def banned_in(node: Node) -> set[str]:
    return {entry["target"] for entry in node.ctl.api("bans")}


def wait(check: Callable[[], bool], timeout: float, what: str) -> float:
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.005)
    return time.monotonic() - start


def dropped(node: Node, source: str) -> bool:
    return not can_ping(node.lab.client_ns, source, node.lab.gateway_v4)


def test_a_ban_on_one_node_drops_on_every_node_and_an_unban_lifts_it(nodes: list[Node]) -> None:
    a, b, c = nodes
    assert all(not dropped(n, C1) for n in nodes)
    a.ctl.cli("ban", C1, "--reason", "scanner")
    took = wait(lambda: C1 in banned_in(b) and C1 in banned_in(c), 1.0, "ban reached b and c")
    assert took < 1.0
    assert dropped(b, C1) and dropped(c, C1) and dropped(a, C1)
    assert not dropped(b, C2)  # the neighbour passes
    (entry,) = [e for e in b.ctl.api("bans") if e["target"] == C1]
    assert entry["source"] == "cluster" and entry["reason"] == "scanner (from a, cli)"

    b.ctl.cli("unban", C1)  # lifted on another node than the one that set it
    wait(lambda: C1 not in banned_in(a) and C1 not in banned_in(c), 1.0, "unban reached a, c")
    assert all(not dropped(n, C1) for n in nodes)
    status = c.ctl.api("status")["cluster"]
    assert status["state"] == "connected" and status["node"] == "c"
    assert {p["node"] for p in status["peers"] if p["alive"]} == {"a", "b"}


def test_a_ttl_ends_on_every_node(nodes: list[Node]) -> None:
    a, b, c = nodes
    c.ctl.cli("ban", C2, "--ttl", "2s")
    wait(lambda: all(C2 in banned_in(n) for n in nodes), 1.0, "ttl ban everywhere")
    assert dropped(a, C2) and dropped(b, C2)
    time.sleep(2.2)
    assert all(not dropped(n, C2) for n in nodes)
    wait(lambda: all(C2 not in banned_in(n) for n in nodes), 2.0, "swept everywhere")


def test_a_node_restarted_while_bans_were_made_catches_up(nodes: list[Node]) -> None:
    a, b, c = nodes
    stop(b.ctl.proc)  # the kernel keeps enforcing; b hears nothing meanwhile
    try:
        a.ctl.cli("ban", C3, "--reason", "while b was away")
        c.ctl.cli("ban", C4)
        c.ctl.cli("unban", C4)
        assert not dropped(b, C3)
    finally:
        restart(b.ctl)
    wait(lambda: C3 in banned_in(b), 2.0, "b caught up")
    assert C4 not in banned_in(b)
    assert dropped(b, C3)
    a.ctl.cli("unban", C3)
    wait(lambda: C3 not in banned_in(b), 1.0, "unban after catch-up")


def test_redis_killed_and_restarted_while_bans_are_made_loses_nothing(
    nodes: list[Node], redis_for_labs: RedisServer
) -> None:
    a, b, c = nodes
    redis_for_labs.kill()
    try:
        wait(lambda: a.ctl.api("status")["cluster"]["state"] == "degraded", 3.0, "a degraded")
        a.ctl.cli("ban", C3, "--reason", "during the outage")
        c.ctl.cli("ban", C4, "--ttl", "1h")
        assert dropped(a, C3) and not dropped(b, C3)  # enforced where it was made
        assert a.ctl.api("status")["cluster"]["queued"] == 1
    finally:
        redis_for_labs.start()  # empty: no persistence
    wait(lambda: all({C3, C4} <= banned_in(n) for n in nodes), 5.0, "replayed everywhere")
    assert dropped(b, C3) and dropped(b, C4) and dropped(c, C3)
    wait(lambda: a.ctl.api("status")["cluster"]["state"] == "connected", 2.0, "a connected")
    for node in nodes:
        node.ctl.cli("unban", C3, check=False)
        node.ctl.cli("unban", C4, check=False)


def test_the_controller_log_says_when_it_is_degraded(nodes: list[Node]) -> None:
    log = nodes[0].ctl.log()
    assert "unreachable" in log and "degraded" in log  # from the test before
    assert "back on Redis" in log


# -- the trust model, with the kernel -------------------------------------------------


def cluster_key_of(node: Node) -> ClusterKey:
    config = tomllib.loads(node.ctl.config_path.read_text())
    return load_key(Path(config["cluster"]["auth"]["key_file"]), "test")


def forge(redis_server: RedisServer, made: Change) -> None:
    """XADD straight into the stream, as anyone with the Redis password can."""
    client = redis.Redis(
        unix_socket_path=str(redis_server.socket_path), password=redis_server.password
    )
    fields = {"a": made.action, "t": made.target, "n": made.node, "r": made.record, "at": made.at}
    fields["nc"] = made.nonce
    if made.signature is not None:
        fields["sig"] = made.signature
    try:
        client.xadd(Keys("stockade:").stream, fields)  # type: ignore[arg-type]
    finally:
        client.close()


def refused_events(node: Node) -> dict[str, int]:
    refused: dict[str, int] = node.ctl.api("status")["cluster"]["refused"].get("event", {})
    return refused


def test_forged_events_change_no_kernel_map(nodes: list[Node], redis_for_labs: RedisServer) -> None:
    a, b, c = nodes
    a.ctl.cli("ban", C4, "--reason", "real")
    wait(lambda: all(C4 in banned_in(n) for n in nodes), 1.0, "the real ban everywhere")
    before = {n.name: (banned_in(n), refused_events(n)) for n in nodes}
    key = cluster_key_of(a)
    now = time.time()
    everything = encode_ban(Ban(parse_target("0.0.0.0/0"), "forged", "cli", now, now + 60), "a")
    signed = Change("a", "ban", "0.0.0.0/0", f"{now:.6f}", new_nonce(), everything, None)
    signed = dataclasses.replace(signed, signature=sign(key, signed.signed("stockade:")))
    forge(redis_for_labs, signed)  # a valid tag, from a node of the cluster: still a /0
    one = encode_ban(Ban(parse_target(C1), "forged", "cli", now, now + 60), "mallory")
    forge(redis_for_labs, Change("mallory", "ban", C1, f"{now:.6f}", new_nonce(), one, None))
    forge(redis_for_labs, Change("a", "unban", C4, f"{now:.6f}", new_nonce(), "", None))
    for node in (b, c):
        wait(
            lambda node=node: (
                sum(refused_events(node).values()) >= sum(before[node.name][1].values()) + 3
            ),
            2.0,
            f"{node.name} refused the three",
        )
        counts = refused_events(node)
        assert counts.get("invalid", 0) == before[node.name][1].get("invalid", 0) + 1
        assert counts.get("unsigned", 0) == before[node.name][1].get("unsigned", 0) + 2
    for node in nodes:
        assert banned_in(node) == before[node.name][0]  # the kernel's bans did not move
        assert not dropped(node, C1) and dropped(node, C4)
    a.ctl.cli("unban", C4)
    wait(lambda: all(not dropped(n, C4) for n in nodes), 1.0, "the real unban everywhere")


def test_reload_rotates_the_cluster_key_without_a_restart(
    nodes: list[Node], tmp_path: Path
) -> None:
    old = tomllib.loads(nodes[0].ctl.config_path.read_text())["cluster"]["auth"]["key_file"]
    new = write_cluster_key(tmp_path / "new.key")
    pids = [n.ctl.proc.pid for n in nodes]

    def use(node: Node, auth: str) -> None:
        text = node.ctl.config_path.read_text()
        start = text.index("[cluster.auth]\n")
        node.ctl.config_path.write_text(text[:start] + "[cluster.auth]\n" + auth)
        node.ctl.cli("reload")

    def key_id(node: Node) -> str:
        kid: str = node.ctl.api("status")["cluster"]["auth"]["key_id"]
        return kid

    first = key_id(nodes[0])
    for node in nodes:  # step 1: accept the new key
        use(node, f'key_file = "{old}"\naccept_key_files = ["{new}"]\n')
    for node in nodes:  # step 2: sign with it, accept the old one
        use(node, f'key_file = "{new}"\naccept_key_files = ["{old}"]\n')
    assert key_id(nodes[0]) != first and len({key_id(n) for n in nodes}) == 1
    a, b, c = nodes
    a.ctl.cli("ban", C3)
    wait(lambda: C3 in banned_in(b) and C3 in banned_in(c), 1.0, "a ban signed with the new key")
    os.chmod(new, 0o644)  # a key file others may read: refused, the running key stays
    result = a.ctl.cli("reload", check=False)
    assert result.returncode != 0 and "group or others may read it" in result.stderr
    assert key_id(a) == key_id(b)
    os.chmod(new, 0o600)
    for node in nodes:  # step 3: the old key goes
        use(node, f'key_file = "{new}"\n')
    c.ctl.cli("unban", C3)
    wait(lambda: C3 not in banned_in(a), 1.0, "an unban signed with the new key")
    assert [n.ctl.proc.pid for n in nodes] == pids and all(n.ctl.proc.poll() is None for n in nodes)
