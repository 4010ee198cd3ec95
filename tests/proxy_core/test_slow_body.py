"""A body that trickles in is cut by a bound on the whole body (body_timeout, body_min_rate),
not only by the idle timer that each byte restarts; the gateway's own waits never count."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path

import aiohttp
from availability_harness import Backend, Raw, access_lines, request_head, wait_until
from proxy_harness import gateway

from stockade.proxy.settings import HealthCheck, Listener, Pool, ProxyConfig, Route, Server


def config(backend: Backend, log: Path, **bounds: float) -> ProxyConfig:
    pool = Pool(
        name="api",
        servers=(Server("127.0.0.1", backend.port),),
        health=HealthCheck(enabled=False),
    )
    return ProxyConfig(
        listeners=(Listener("127.0.0.1", 0),),
        routes=(Route(name="api", pool="api"),),
        pools=(pool,),
        workers=1,
        access_log=str(log),
        body_idle_timeout=5.0,  # never reached by a byte a second
        **bounds,  # type: ignore[arg-type]
    )


async def trickle(raw: Raw, data: bytes, pause: float) -> None:
    """Send `data` in pieces with `pause` between them, until the gateway stops listening."""
    for i in range(len(data)):
        try:
            await raw.send(data[i : i + 1])
        except ConnectionError:
            return
        await asyncio.sleep(pause)


def test_a_body_at_one_byte_a_second_is_cut_by_body_timeout(tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def scenario() -> None:
        backend = Backend()
        await backend.start()
        try:
            bounds = {"body_timeout": 2.5, "body_min_rate": 0}
            async with gateway(config(backend, log, **bounds)) as (url, gw):
                raw = await Raw.connect(url)
                await raw.send(request_head("POST", "/upload", length=100))
                started = time.monotonic()
                sender = asyncio.create_task(trickle(raw, b"y" * 100, 1.0))
                status, _, body = await raw.response(timeout=8.0)
                elapsed = time.monotonic() - started
                sender.cancel()
                assert (status, json.loads(body)["error"]) == (408, "body_too_slow")
                assert 2.0 < elapsed < 4.0
                # the upstream exchange it held is closed, and the server is not blamed
                await wait_until(lambda: backend.cut_bodies == 1)
                (state,) = gw.upstreams.states["api"].servers
                assert (state.failures, state.outstanding) == (0, 0)
                (line,) = await access_lines(gw, log, 1)
                assert (line["status"], line["decision"], line["reason"]) == (
                    408,
                    "limit",
                    "body_too_slow",
                )
                raw.close()
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_body_min_rate_cuts_a_slow_body_and_passes_a_fast_one(tmp_path: Path) -> None:
    log = tmp_path / "access.log"

    async def scenario() -> None:
        backend = Backend()
        await backend.start()
        try:
            # after 1 s of waiting, 200 bytes/s: 100 bytes/s is cut after about 2 s
            bounds = {"body_timeout": 0.0, "body_min_rate": 200, "body_rate_grace": 1.0}
            async with gateway(config(backend, log, **bounds)) as (url, _):
                raw = await Raw.connect(url)
                await raw.send(request_head("POST", "/upload", length=1000))
                started = time.monotonic()
                sender = asyncio.create_task(trickle(raw, b"y" * 1000, 0.01))
                status, _, body = await raw.response(timeout=8.0)
                elapsed = time.monotonic() - started
                sender.cancel()
                assert (status, json.loads(body)["error"]) == (408, "body_too_slow")
                assert 1.5 < elapsed < 4.0
                raw.close()

                # 4 MiB in 64 KiB pieces, as fast as the socket takes them: well above the rate
                async def chunks() -> object:
                    for _ in range(64):
                        yield b"z" * 65536

                async with aiohttp.ClientSession() as s:
                    async with s.post(f"{url}/upload", data=chunks()) as r:
                        assert r.status == 200
                        assert (await r.json())["body_size"] == 4 * 1024 * 1024
        finally:
            await backend.stop()

    asyncio.run(scenario())


def test_time_in_the_queue_is_not_the_clients(tmp_path: Path) -> None:
    """A whole body sent at once, then held by the gateway while it waits for a slot:
    the body bound counts only the time spent waiting for the client's bytes."""
    log = tmp_path / "access.log"

    async def scenario() -> None:
        backend = Backend(delay=1.5)
        await backend.start()
        try:
            base = config(backend, log, body_timeout=0.5, body_min_rate=0)
            pool = replace(base.pools[0], maxconn=1)
            async with gateway(replace(base, pools=(pool,))) as (url, _):
                async with aiohttp.ClientSession() as s:
                    busy = asyncio.create_task(s.get(f"{url}/slow"))
                    await wait_until(lambda: backend.active == 1)
                    async with s.post(f"{url}/upload", data=b"q" * 5000) as r:
                        assert r.status == 200  # after ~1.5 s in the queue
                        assert (await r.json())["body_size"] == 5000
                    (await busy).release()
        finally:
            await backend.stop()

    asyncio.run(scenario())
