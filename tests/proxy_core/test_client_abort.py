"""A client that hangs up mid-request is the client's doing: logged once as 499, counted,
never held against the server, and the upstream exchange it left is closed, not pooled."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import aiohttp
import pytest
from availability_harness import (
    Backend,
    Raw,
    access_lines,
    request_head,
    running_gateway,
    sample,
    wait_until,
)

from stockade.proxy.app import Gateway
from stockade.proxy.settings import HealthCheck, Listener, Pool, ProxyConfig, Route, Server


def config(backend: Backend, log: Path) -> ProxyConfig:
    # One server, and the default passive check: 3 failures in a row would eject it.
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
    )


def quiet(caplog: pytest.LogCaptureFixture) -> None:
    """No traceback and nothing at WARNING or above from the gateway or aiohttp."""
    loud = [
        r
        for r in caplog.records
        if r.name.startswith(("stockade", "aiohttp", "asyncio"))
        and (r.levelno >= logging.WARNING or r.exc_info)
    ]
    assert loud == [], [r.getMessage() for r in loud]


def server_untouched(gw: Gateway) -> None:
    (state,) = gw.upstreams.states["api"].servers
    assert (state.failures, state.consecutive_failures, state.outstanding) == (0, 0, 0)
    assert state.ejected_until is None


async def get_ok(url: str) -> None:
    async with aiohttp.ClientSession() as s, s.get(f"{url}/after") as r:
        assert r.status == 200


@pytest.mark.parametrize("cancel_on_hangup", [True, False], ids=["cancelled", "read_fails"])
def test_aborted_uploads_leave_the_only_server_in_the_pool(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cancel_on_hangup: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    log = tmp_path / "access.log"

    async def scenario() -> None:
        backend = Backend()
        await backend.start()
        try:
            cfg = config(backend, log)
            async with running_gateway(cfg, cancel_on_hangup=cancel_on_hangup) as (url, gw):
                connections = gw.upstreams.connections[f"127.0.0.1:{backend.port}"]
                for batch in range(3):  # 24 aborted uploads, 8 at a time
                    clients = [await Raw.connect(url) for _ in range(8)]
                    for raw in clients:
                        await raw.send(request_head("POST", "/upload", length=1_000_000))
                        await raw.send(b"x" * 20_000)
                    # every upload is under way at the upstream before its client leaves
                    await wait_until(lambda: backend.active == 8)
                    for i, raw in enumerate(clients):
                        raw.abort(reset=(batch + i) % 2 == 0)  # FINs and RSTs
                    # the gateway closes each upstream exchange it was feeding
                    await wait_until(lambda: backend.active == 0)
                    assert connections.idle_count == 0  # none went back to the pool
                assert backend.cut_bodies == 24
                lines = await access_lines(gw, log, 24)
                assert len(lines) == 24  # once each
                assert len({line["request_id"] for line in lines}) == 24
                assert {(x["status"], x["decision"], x["reason"]) for x in lines} == {
                    (499, "client_abort", "during_request_body")
                }
                assert all(0 < x["bytes_in"] < 1_000_000 for x in lines)
                server_untouched(gw)
                assert (
                    sample(gw, "stockade_proxy_client_aborts_total", phase="during_request_body")
                    == 24
                )
                await get_ok(url)  # the only server is still in the pool
                assert gw.metrics.in_flight.value == 0
        finally:
            await backend.stop()

    asyncio.run(scenario())
    quiet(caplog)


def test_hanging_up_while_the_upstream_thinks_closes_that_exchange_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    log = tmp_path / "access.log"

    async def scenario() -> None:
        backend = Backend(delay=1.5)
        await backend.start()
        try:
            async with running_gateway(config(backend, log)) as (url, gw):
                state = gw.upstreams.states["api"].servers[0]
                connections = gw.upstreams.connections[state.address]
                clients = [await Raw.connect(url) for _ in range(4)]
                for raw in clients:
                    await raw.send(request_head("GET", "/slow"))
                await wait_until(lambda: backend.active == 4)
                for i, raw in enumerate(clients):
                    raw.abort(reset=i % 2 == 0)
                left = time.monotonic()
                # the gateway lets go long before the upstream would have answered
                await wait_until(lambda: state.outstanding == 0, timeout=1.0)
                lines = await access_lines(gw, log, 4, timeout=1.0)
                assert time.monotonic() - left < 1.0
                assert [(x["status"], x["decision"], x["reason"]) for x in lines] == [
                    (499, "client_abort", "before_response")
                ] * 4
                assert connections.idle_count == 0
                server_untouched(gw)
                await get_ok(url)
                assert (
                    sample(gw, "stockade_proxy_client_aborts_total", phase="before_response") == 4
                )
        finally:
            await backend.stop()

    asyncio.run(scenario())
    quiet(caplog)


@pytest.mark.parametrize("cancel_on_hangup", [True, False], ids=["cancelled", "write_fails"])
def test_hanging_up_while_the_response_streams(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, cancel_on_hangup: bool
) -> None:
    caplog.set_level(logging.DEBUG)
    log = tmp_path / "access.log"

    async def scenario() -> None:
        backend = Backend(stream_chunks=400, stream_pause=0.01)  # 25 MiB over 4 s
        await backend.start()
        try:
            cfg = config(backend, log)
            async with running_gateway(cfg, cancel_on_hangup=cancel_on_hangup) as (url, gw):
                state = gw.upstreams.states["api"].servers[0]
                connections = gw.upstreams.connections[state.address]
                raw = await Raw.connect(url)
                await raw.send(request_head("GET", "/stream"))
                status, _, _ = await raw.head()
                assert status == 200
                await raw.reader.readexactly(200_000)
                raw.abort(reset=True)
                await wait_until(lambda: state.outstanding == 0, timeout=2.0)
                (line,) = await access_lines(gw, log, 1)
                assert (line["status"], line["decision"], line["reason"]) == (
                    499,
                    "client_abort",
                    "during_response",
                )
                assert 200_000 <= line["bytes_out"] < 400 * 65536
                assert connections.idle_count == 0  # cut mid-body: never reused
                # the upstream's connection was closed: its writes fail
                await wait_until(lambda: backend.cut_responses == 1, timeout=5.0)
                server_untouched(gw)
                await get_ok(url)
        finally:
            await backend.stop()

    asyncio.run(scenario())
    quiet(caplog)
