"""maxconn through the gateway: a server never has more than maxconn requests of a worker
at once; the rest wait in the pool's queue, and get 503 when it is full or too slow."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from availability_harness import Backend, access_lines, sample
from proxy_harness import gateway

from stockade.config import ConfigError, parse_config
from stockade.proxy.settings import HealthCheck, Listener, Pool, ProxyConfig, Route, Server


def config(backend: Backend, log: Path, **pool: Any) -> ProxyConfig:
    return ProxyConfig(
        listeners=(Listener("127.0.0.1", 0),),
        routes=(Route(name="api", pool="api"),),
        pools=(
            Pool(
                name="api",
                servers=(Server("127.0.0.1", backend.port),),
                health=HealthCheck(enabled=False),
                **pool,
            ),
        ),
        workers=1,
        access_log=str(log),
    )


async def fetch(s: aiohttp.ClientSession, url: str) -> tuple[int, str, str | None]:
    async with s.get(f"{url}/slow") as r:
        body = await r.read()
        reason = "" if r.status == 200 else json.loads(body)["error"]
        return r.status, reason, r.headers.get("Retry-After")


def test_six_slow_requests_two_at_a_time_all_served(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = Backend(delay=0.4)
        await backend.start()
        try:
            cfg = config(backend, tmp_path / "log", maxconn=2, queue_timeout=10.0)
            async with gateway(cfg) as (url, gw), aiohttp.ClientSession() as s:
                started = time.monotonic()
                results = await asyncio.gather(*(fetch(s, url) for _ in range(6)))
                elapsed = time.monotonic() - started
                assert [r[0] for r in results] == [200] * 6
                assert backend.peak == 2  # the upstream never saw a third at once
                assert elapsed >= 3 * 0.4 * 0.9  # three rounds of two
                assert gw.upstreams.states["api"].queued == 4
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_six_slow_uploads_two_at_a_time(tmp_path: Path) -> None:
    """Slow uploads hold their slot while they stream: the others queue at the gateway."""

    async def scenario() -> None:
        backend = Backend()
        await backend.start()
        try:
            cfg = config(backend, tmp_path / "log", maxconn=2, queue_timeout=10.0)

            async def slow_body() -> Any:
                for _ in range(5):
                    yield b"u" * 1000
                    await asyncio.sleep(0.08)

            async def upload(s: aiohttp.ClientSession, url: str) -> int:
                async with s.post(f"{url}/upload", data=slow_body()) as r:
                    assert (await r.json())["body_size"] == 5000
                    return r.status

            async with gateway(cfg) as (url, _), aiohttp.ClientSession() as s:
                statuses = await asyncio.gather(*(upload(s, url) for _ in range(6)))
                assert statuses == [200] * 6
                assert backend.peak == 2
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_queue_timeout_is_503_and_not_the_servers_fault(tmp_path: Path) -> None:
    log = tmp_path / "log"

    async def scenario() -> None:
        backend = Backend(delay=1.0)
        await backend.start()
        try:
            cfg = config(backend, log, maxconn=2, queue_timeout=0.3)
            async with gateway(cfg) as (url, gw), aiohttp.ClientSession() as s:
                results = await asyncio.gather(*(fetch(s, url) for _ in range(6)))
                assert sorted(results) == [(200, "", None)] * 2 + [(503, "queue_timeout", "1")] * 4
                assert backend.peak == 2 and len(backend.seen) == 2
                (state,) = gw.upstreams.states["api"].servers
                assert (state.failures, state.consecutive_failures) == (0, 0)
                assert (
                    sample(
                        gw,
                        "stockade_proxy_upstream_queue_refused_total",
                        pool="api",
                        reason="queue_timeout",
                    )
                    == 4
                )
                lines = await access_lines(gw, log, 6)
                assert (
                    sorted((x["status"], x["decision"], x["reason"]) for x in lines)[2:]
                    == [(503, "upstream_error", "queue_timeout")] * 4
                )
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_a_full_queue_refuses_at_once(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = Backend(delay=0.5)
        await backend.start()
        try:
            cfg = config(backend, tmp_path / "log", maxconn=2, max_queue=1, queue_timeout=10.0)
            async with gateway(cfg) as (url, gw), aiohttp.ClientSession() as s:
                tasks = [asyncio.create_task(fetch(s, url)) for _ in range(6)]
                done, _ = await asyncio.wait(tasks, timeout=0.4)
                # the three that found the queue full were answered before any slot freed
                assert sorted(t.result() for t in done) == [(503, "queue_full", "1")] * 3
                results = await asyncio.gather(*tasks)
                assert sorted(r[0] for r in results) == [200, 200, 200, 503, 503, 503]
                assert backend.peak == 2
                assert gw.upstreams.states["api"].queue_full == 3
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_maxconn_zero_is_unlimited(tmp_path: Path) -> None:
    async def scenario() -> None:
        backend = Backend(delay=0.3)
        await backend.start()
        try:
            cfg = config(backend, tmp_path / "log", maxconn=0)
            async with gateway(cfg) as (url, _), aiohttp.ClientSession() as s:
                results = await asyncio.gather(*(fetch(s, url) for _ in range(6)))
                assert [r[0] for r in results] == [200] * 6
                assert backend.peak == 6
        finally:
            await backend.stop()

    asyncio.run(scenario())


def _parsed(pool: dict[str, Any], **proxy: Any) -> ProxyConfig:
    return parse_config(
        {"proxy": {"pools": {"api": {"servers": ["127.0.0.1:9000"], **pool}}, **proxy}}
    ).proxy


def test_the_keys_and_their_defaults() -> None:
    default = _parsed({})
    (pool,) = default.pools
    assert (pool.maxconn, pool.max_queue, pool.queue_timeout) == (100, 1000, 10.0)
    assert (default.body_timeout, default.body_min_rate, default.body_rate_grace) == (
        300.0,
        500,
        20.0,
    )
    (pool,) = _parsed({"maxconn": 0, "max_queue": 0, "queue_timeout": "250ms"}).pools
    assert (pool.maxconn, pool.max_queue, pool.queue_timeout) == (0, 0, 0.25)
    cfg = _parsed({}, body_timeout="0", body_min_rate="1KiB", body_rate_grace="0s")
    assert (cfg.body_timeout, cfg.body_min_rate, cfg.body_rate_grace) == (0.0, 1024, 0.0)


@pytest.mark.parametrize(
    ("pool", "proxy", "message"),
    [
        ({"maxconn": -1}, {}, "proxy.pools.api.maxconn: -1 is out of range"),
        ({"maxconn": True}, {}, "proxy.pools.api.maxconn: expected"),
        ({"max_queue": -5}, {}, "proxy.pools.api.max_queue: -5 is out of range"),
        ({"queue_timeout": "0s"}, {}, "proxy.pools.api.queue_timeout"),
        ({"queue_timeout": 10}, {}, "proxy.pools.api.queue_timeout: expected"),
        ({}, {"body_timeout": "soon"}, "proxy.body_timeout"),
        ({}, {"body_min_rate": "fast"}, "proxy.body_min_rate: invalid size"),
        ({}, {"body_min_rate": -1}, "proxy.body_min_rate"),
        ({}, {"body_rate_grace": "-1s"}, "proxy.body_rate_grace"),
    ],
)
def test_bad_values_name_the_key(pool: dict[str, Any], proxy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        _parsed(pool, **proxy)
