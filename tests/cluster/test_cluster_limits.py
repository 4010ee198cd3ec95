"""Cluster-scoped rate limits, quotas and anomaly rules: three gateways, one real Redis."""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import redis
from cluster_gateways import gateways, proxy_config, upstream

from stockade.cluster_settings import ClusterConfig
from stockade.lab.redis_server import RedisServer
from stockade.proxy.api_keys import entry_to_toml, generate_key
from stockade.proxy.quota import read_usage
from stockade.proxy.settings import ProxyConfig
from stockade.redis_conn import check_credentials

SCANNER_RULE = """
[[proxy.anomaly.rules]]
name = "scanner"
when = "distinct_404_paths > 5 in 1m"
action = "deny"
duration = "1m"
scope = "{scope}"
"""
LIMIT = """
[proxy.rate_limiting.limits.global]
rate = "30/min"
key = "ip"
all_routes = true
scope = "{scope}"
"""


async def spread(urls: list[str], count: int, path: str = "/x", **kw: object) -> list[int]:
    """`count` requests, round-robin over the gateways; their statuses in order
    (0: the connection was closed at once, as for a source a rule denies)."""
    statuses = []
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            try:
                async with session.get(urls[i % len(urls)] + path, **kw) as response:  # type: ignore[arg-type]
                    statuses.append(response.status)
            except aiohttp.ServerDisconnectedError:
                statuses.append(0)
    return statuses


def test_a_cluster_limit_holds_across_three_gateways(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def scenario() -> None:
        async with upstream() as port:
            for scope, allowed in (("cluster", 30), ("local", 90)):  # local: 30 per node
                configs = [
                    proxy_config(
                        tmp_path / scope / f"n{i}",
                        port,
                        redis_server.url(),
                        LIMIT.format(scope=scope),
                    )
                    for i in range(3)
                ]
                async with gateways(configs) as gws:
                    statuses = await spread([url for url, _ in gws], 120)
                assert Counter(statuses) == {200: allowed, 429: 120 - allowed}, scope
                assert statuses[:allowed] == [200] * allowed  # the first ones, whichever node

    asyncio.run(scenario())


def test_cluster_quotas_are_kept_in_redis(tmp_path: Path, redis_server: RedisServer) -> None:
    key, entry = generate_key("acme", "free")
    quotas = 'scope = "cluster"\ntimezone = "UTC"'
    extra = "[proxy.quotas.plans.free]\nper_day = 10\n" + entry_to_toml(
        entry, "proxy.auth.api_keys"
    )

    def configs(tag: str) -> list[ProxyConfig]:
        homes = [tmp_path / tag / f"n{i}" for i in range(3)]
        return [
            proxy_config(
                h, port_box[0], redis_server.url(), extra, 'auth = "api_key"', quotas=quotas
            )
            for h in homes
        ]

    port_box: list[int] = []

    async def scenario() -> None:
        async with upstream() as port:
            port_box.append(port)
            headers = {"X-API-Key": key}
            async with gateways(configs("first")) as gws:
                statuses = await spread([u for u, _ in gws], 15, headers=headers)
                assert Counter(statuses) == {200: 10, 429: 5}
            async with gateways(configs("restarted")) as gws:  # new nodes, same Redis
                assert await spread([u for u, _ in gws], 3, headers=headers) == [429] * 3

    asyncio.run(scenario())
    # each node keeps the cluster's count it saw in its usage database (`stockade usage`)
    (row,) = read_usage(tmp_path / "first" / "n0" / "usage.db")  # n0 answered the 10th
    assert (row.consumer, row.plan, row.count) == ("acme", "free", 10)
    day = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")
    client = redis.Redis(
        unix_socket_path=str(redis_server.socket_path), password=redis_server.password
    )
    assert client.get(f"stockade:quota:acme:{day}") == b"10"
    assert 0 < client.ttl(f"stockade:quota:acme:{day}") <= 8 * 86400  # kept past the day


@pytest.mark.parametrize(
    ("fallback", "expected"),
    [("local", {200: 10, 429: 5}), ("open", {200: 15}), ("closed", {503: 15})],
)
def test_redis_down_falls_back_as_configured(
    tmp_path: Path,
    redis_server: RedisServer,
    fallback: str,
    expected: dict[int, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    extra = LIMIT.format(scope="cluster")
    url = redis_server.url()
    redis_server.stop()

    async def scenario() -> None:
        async with upstream() as port:
            fallback_key = f'on_redis_down = "{fallback}"'
            config = proxy_config(tmp_path / "n0", port, url, extra, cluster=fallback_key)
            async with gateways([config]) as gws:
                started = asyncio.get_running_loop().time()
                statuses = await spread([gws[0][0]], 15)
                took = asyncio.get_running_loop().time() - started
                gw = gws[0][1]
                gw.sync_metrics()
                degraded = gw.metrics.cluster_degraded._value.get()  # type: ignore[attr-defined]
        assert Counter(statuses) == expected
        assert took < 3.0  # one timed-out try, then straight to the fallback
        assert degraded == 1

    with caplog.at_level(logging.WARNING, "stockade.proxy"):
        asyncio.run(scenario())
    assert any("unreachable" in r.message and "degraded" in r.message for r in caplog.records)


def test_a_scanner_spread_over_nodes_is_caught_by_a_cluster_rule(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    async def scenario(scope: str) -> list[int]:
        rule = SCANNER_RULE.format(scope=scope)
        async with upstream() as port:
            configs = [
                proxy_config(tmp_path / scope / f"n{i}", port, redis_server.url(), rule)
                for i in range(3)
            ]
            async with gateways(configs) as gws:
                urls = [u for u, _ in gws]
                async with aiohttp.ClientSession() as session:
                    for i in range(6):  # 2 distinct 404 paths per node, 6 in the cluster
                        async with session.get(f"{urls[i % 3]}/status/404/p{i}") as r:
                            assert r.status == 404
                        await asyncio.sleep(0.02)  # counted after the response, off its path
                await asyncio.sleep(0.2)
                return await spread(urls, 3)

    assert asyncio.run(scenario("local")) == [200, 200, 200]  # no node saw more than 2
    caught = asyncio.run(scenario("cluster"))
    assert 200 in caught and (403 in caught or 0 in caught)  # the node that saw it denies


def test_a_wrong_password_is_a_clear_proxy_startup_error(redis_server: RedisServer) -> None:
    bad = ClusterConfig(backend="redis", url=redis_server.url(password="letmein-42"))
    message = check_credentials(bad)
    assert message is not None and "refused the password" in message
    assert "letmein-42" not in message  # never the password itself
    assert check_credentials(ClusterConfig(backend="redis", url=redis_server.url())) is None


def test_a_cluster_rule_judges_local_counts_scaled_while_redis_is_away(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    rule = SCANNER_RULE.format(scope="cluster")
    url = redis_server.url()
    redis_server.stop()

    async def scenario() -> list[int]:
        async with upstream() as port:
            config = proxy_config(tmp_path / "n0", port, url, rule)  # expected_nodes = 3
            async with gateways([config]) as gws:
                base = gws[0][0]
                async with aiohttp.ClientSession() as session:
                    for i in range(2):  # 2 here x 3 nodes > 5
                        async with session.get(f"{base}/status/404/p{i}") as r:
                            assert r.status == 404
                return await spread([base], 1)

    assert asyncio.run(scenario()) in ([403], [0])
