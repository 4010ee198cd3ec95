"""ClusterCounters against a real Redis: batching, lost scripts, windows."""

from __future__ import annotations

import asyncio
from typing import Any

import redis

from stockade.cluster_settings import ClusterConfig
from stockade.lab.redis_server import RedisServer
from stockade.proxy.cluster_counters import ClusterCounters


def counters(server: RedisServer) -> ClusterCounters:
    return ClusterCounters(ClusterConfig(backend="redis", url=server.url(), timeout=1.0))


def test_concurrent_checks_share_round_trips_and_count_exactly(redis_server: RedisServer) -> None:
    async def scenario() -> tuple[list[Any], int]:
        c = counters(redis_server)
        batches = 0
        execute = c._execute

        async def counted(batch: Any, reload: bool = True) -> list[Any]:
            nonlocal batches
            batches += 1
            return await execute(batch, reload)

        c._execute = counted  # type: ignore[method-assign]
        try:
            results = await asyncio.gather(*(c.limit("k", 60, 1, 30) for _ in range(50)))
        finally:
            await c.close()
        return results, batches

    results, batches = asyncio.run(scenario())
    assert sum(1 for allowed, _, _ in results if allowed) == 30
    assert batches <= 3  # 50 requests, not 50 round trips


def test_scripts_lost_by_redis_are_loaded_again(redis_server: RedisServer) -> None:
    async def scenario() -> list[Any]:
        c = counters(redis_server)
        try:
            first = await c.limit("k", 60, 1, 5)
            direct = redis.Redis(
                unix_socket_path=str(redis_server.socket_path), password=redis_server.password
            )
            direct.script_flush()
            direct.close()
            second = await c.limit("k", 60, 1, 5)
            return [first, second, c.degraded]
        finally:
            await c.close()

    first, second, degraded = asyncio.run(scenario())
    assert first[:2] == (True, 1) and second[:2] == (True, 2) and degraded is False


def test_a_window_refuses_over_the_limit_with_the_wait(redis_server: RedisServer) -> None:
    async def scenario() -> list[Any]:
        c = counters(redis_server)
        try:
            return [await c.limit("w", 10, 1, 2) for _ in range(3)]
        finally:
            await c.close()

    (a, b, refused) = asyncio.run(scenario())
    assert a[:2] == (True, 1) and b[:2] == (True, 2)
    allowed, total, wait = refused
    assert not allowed and total == 2 and 9.0 < wait <= 10.5  # until the first leaves
