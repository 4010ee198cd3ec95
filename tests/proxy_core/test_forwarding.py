"""The forwarder end to end on loopback: headers, balancing, retries, errors, limits."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
from proxy_harness import Upstream, config_for, gateway, log_lines, with_route


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


async def two_upstreams() -> list[Upstream]:
    ups = [Upstream("a"), Upstream("b")]
    for up in ups:
        await up.start()
    return ups


def test_forwards_with_forwarding_headers_and_strips_hop_by_hop(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        log = tmp_path / "access.log"
        try:
            async with gateway(config_for(ups, log)) as (url, _), aiohttp.ClientSession() as s:
                async with s.get(
                    f"{url}/api/x?q=1",
                    headers={
                        "X-Forwarded-For": "6.6.6.6",
                        "Connection": "keep-alive, X-Client-Hop",
                        "X-Client-Hop": "1",
                        "Authorization": "Bearer secret-token",
                        "Cookie": "session=secret-cookie",
                    },
                ) as r:
                    body = await r.json()
                    assert r.status == 200
                    assert len(r.headers["X-Request-ID"]) == 32
                    assert "X-Upstream-Hop" not in r.headers
                    request_id = r.headers["X-Request-ID"]
            seen = (ups[0].seen + ups[1].seen)[0]
            assert body["path"] == "/api/x?q=1"
            assert seen["headers"]["X-Forwarded-For"] == "127.0.0.1"  # the client's claim dropped
            assert seen["headers"]["X-Forwarded-Proto"] == "http"
            assert seen["headers"]["X-Request-ID"] == request_id
            assert "X-Client-Hop" not in seen["headers"]
            assert seen["headers"]["Authorization"] == "Bearer secret-token"
            (line,) = log_lines(log)
            assert line["request_id"] == request_id and line["status"] == 200
            assert line["decision"] == "allowed" and line["upstream"].startswith("127.0.0.1:")
            assert line["path"] == "/api/x" and line["method"] == "GET"
            assert "secret" not in log.read_text()
        finally:
            for up in ups:
                await up.stop()

    run(scenario())


def test_round_robin_spreads_requests(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        try:
            async with gateway(config_for(ups, tmp_path / "log")) as (url, _):
                async with aiohttp.ClientSession() as s:
                    for _ in range(10):
                        async with s.get(f"{url}/x") as r:
                            assert r.status == 200
            assert len(ups[0].seen) == 5 and len(ups[1].seen) == 5
        finally:
            for up in ups:
                await up.stop()

    run(scenario())


def test_idempotent_request_retries_a_dead_server_and_post_does_not(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        await ups[1].stop()  # its port now refuses connections
        try:
            config = config_for(ups, tmp_path / "log")
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                for _ in range(4):
                    async with s.get(f"{url}/x") as r:
                        assert r.status == 200
                statuses = []
                for _ in range(4):
                    async with s.post(f"{url}/x", data=b"payload") as r:
                        statuses.append(r.status)
                        if r.status == 502:
                            body = await r.json()
                            assert body["error"] == "upstream_unreachable"
                            assert body["request_id"] == r.headers["X-Request-ID"]
            assert statuses.count(502) >= 1  # a POST is never retried elsewhere
            assert len(ups[0].seen) == 4 + statuses.count(200)
        finally:
            await ups[0].stop()

    run(scenario())


def test_all_servers_down_answers_503_quickly_after_passive_ejection(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        for up in ups:
            await up.stop()
        try:
            async with gateway(config_for(ups, tmp_path / "log")) as (url, _):
                async with aiohttp.ClientSession() as s:
                    statuses = []
                    for _ in range(8):
                        async with s.get(f"{url}/x") as r:
                            statuses.append(r.status)
                    started = time.monotonic()
                    async with s.get(f"{url}/x") as r:
                        assert r.status == 503
                        assert (await r.json())["error"] == "no_healthy_server"
                    assert time.monotonic() - started < 0.5
            assert set(statuses) <= {502, 503}
        finally:
            pass

    run(scenario())


def test_upstream_timeout_is_504(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        try:
            config = with_route(config_for(ups, tmp_path / "log"), read_timeout=0.3)
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                async with s.get(f"{url}/slow") as r:
                    assert r.status == 504
                    assert (await r.json())["error"] == "upstream_timeout"
        finally:
            for up in ups:
                await up.stop()

    run(scenario())


def test_body_limits_declared_and_streamed(tmp_path: Path) -> None:
    async def chunks(n: int) -> AsyncIterator[bytes]:
        for _ in range(n):
            yield b"x" * 1024

    async def scenario() -> None:
        ups = await two_upstreams()
        try:
            config = with_route(config_for(ups, tmp_path / "log"), max_body_size=4096)
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                async with s.post(f"{url}/x", data=b"x" * 5000) as r:
                    assert r.status == 413
                async with s.post(f"{url}/x", data=chunks(10)) as r:  # chunked, no length
                    assert r.status in (413, 502)
                async with s.post(f"{url}/x", data=b"x" * 4096) as r:
                    assert r.status == 200
                    assert (await r.json())["body_size"] == 4096
            assert [e["body_size"] for e in ups[0].seen + ups[1].seen] == [4096]
        finally:
            for up in ups:
                await up.stop()

    run(scenario())


def test_large_download_streams(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        try:
            async with gateway(config_for(ups, tmp_path / "log")) as (url, _):
                async with aiohttp.ClientSession() as s, s.get(f"{url}/bytes/20000000") as r:
                    assert r.status == 200
                    assert r.headers["Content-Length"] == "20000000"
                    total = 0
                    async for chunk in r.content.iter_any():
                        total += len(chunk)
            assert total == 20_000_000
        finally:
            for up in ups:
                await up.stop()

    run(scenario())


def test_no_route_and_bad_path(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        try:
            config = with_route(config_for(ups, tmp_path / "log"), path_prefix="/api")
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                async with s.get(f"{url}/other") as r:
                    assert r.status == 404
                    assert (await r.json())["error"] == "no_route"
                async with s.get(f"{url}/api/a%2Fb") as r:
                    assert r.status == 400
                async with s.get(f"{url}/api/../api/x") as r:  # aiohttp keeps it raw? normalized
                    assert r.status == 200
            assert [e["path"] for e in ups[0].seen + ups[1].seen] == ["/api/x"]
        finally:
            for up in ups:
                await up.stop()

    run(scenario())


def test_total_timeout_bounds_the_wait_for_the_response_head(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        try:
            config = with_route(config_for(ups, tmp_path / "log"), total_timeout=0.3)
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                started = time.monotonic()
                async with s.get(f"{url}/slow") as r:
                    assert r.status == 504
                assert time.monotonic() - started < 2
        finally:
            for up in ups:
                await up.stop()

    run(scenario())


def test_access_log_lines_are_valid_json_whatever_the_route_name(tmp_path: Path) -> None:
    async def scenario() -> None:
        ups = await two_upstreams()
        log = tmp_path / "access.log"
        try:
            config = with_route(config_for(ups, log), name='we"ird\\name')
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                async with s.get(f"{url}/a/'b'(c)!*?x=1") as r:
                    assert r.status == 200
                async with s.get(f"{url}/%2F") as r:
                    assert r.status == 400
            lines = log_lines(log)  # json.loads on every line
            assert [line["route"] for line in lines] == ['we"ird\\name', None]
            assert lines[0]["path"] == "/a/'b'(c)!*"
            assert lines[1]["decision"] == "path" and lines[1]["reason"] == "encoded_slash"
        finally:
            for up in ups:
                await up.stop()

    run(scenario())
