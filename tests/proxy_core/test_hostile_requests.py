"""Hostile requests through the whole gateway: each is refused and the upstream never sees it."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from proxy_harness import Upstream, config_for, gateway


async def raw_exchange(url: str, payload: bytes) -> bytes:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()
        await writer.wait_closed()


CASES = [
    (
        "content-length and transfer-encoding",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n",
        400,
    ),
    (
        "gzip then chunked",
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "content-length twice",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabc",
        400,
    ),
    ("obs-fold", b"GET /x HTTP/1.1\r\nHost: t\r\nX-A: a\r\n b\r\n\r\n", 400),
    ("encoded slash", b"GET /a%2Fb HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("encoded dot-segment", b"GET /a/%2e%2e/b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("nul in the path", b"GET /a%00b HTTP/1.1\r\nHost: t\r\n\r\n", 400),
    ("URL too long", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (
        "too many headers",
        b"GET /x HTTP/1.1\r\nHost: t\r\n"
        + b"".join(b"X-%d: 1\r\n" % i for i in range(200))
        + b"\r\n",
        431,
    ),
    (
        "declared body over the limit",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 99999999\r\n\r\n",
        413,
    ),
    (
        "HTTP/1.0 with chunked",
        b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
]


@pytest.mark.parametrize(("name", "payload", "status"), CASES, ids=[c[0] for c in CASES])
def test_refused_before_the_upstream(
    tmp_path: Path, name: str, payload: bytes, status: int
) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            async with gateway(config_for([up], tmp_path / "log")) as (url, _):
                reply = await raw_exchange(url, payload)
            status_line = reply.split(b"\r\n", 1)[0]
            assert status_line.split(b" ")[1] == str(status).encode(), (name, reply[:300])
            assert up.seen == [], f"{name}: the upstream saw {up.seen}"
        finally:
            await up.stop()

    asyncio.run(scenario())


def test_a_good_request_does_reach_the_upstream(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            async with gateway(config_for([up], tmp_path / "log")) as (url, _):
                reply = await raw_exchange(
                    url,
                    b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n"
                    b"Connection: close\r\n\r\nabc",
                )
            assert reply.startswith(b"HTTP/1.1 200 ")
            assert [s["body_size"] for s in up.seen] == [3]
        finally:
            await up.stop()

    asyncio.run(scenario())


def test_no_version_banner_on_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            async with gateway(config_for([up], tmp_path / "log")) as (url, _):
                reply = await raw_exchange(url, b"GET /a%2Fb HTTP/1.1\r\nHost: t\r\n\r\n")
            assert b"\r\nServer: stockade\r\n" in reply
            assert b"aiohttp" not in reply and b"Python" not in reply
        finally:
            await up.stop()

    asyncio.run(scenario())
