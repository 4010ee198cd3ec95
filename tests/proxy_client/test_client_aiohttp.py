"""The upstream client against a real aiohttp server: methods, framings, reuse, flow control."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator

from client_harness import aiohttp_upstream, run

from stockade.clock import FakeClock
from stockade.proxy import upstream_client
from stockade.proxy.upstream_client import UpstreamPool

HOST = [("Host", "upstream.test")]


def test_get_returns_status_reason_headers_in_order_and_body() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/hello?a=1", HOST)
            assert (resp.status, resp.reason, resp.content_length) == (200, "OK", 5)
            names = [name for name, _ in resp.headers]
            assert names[:2] == ["X-Path", "Content-Type"]  # as sent, in order
            assert ("X-Path", "/hello?a=1") in resp.headers
            assert await resp.read() == b"hello"
            resp.release()
            resp.release()  # idempotent
            await pool.close()

    run(go())


def test_post_bytes_body_gets_content_length() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("POST", "/echo", HOST, b"abc" * 1000)
            seen = json.loads(await resp.read())
            assert seen["cl"] == "3000" and seen["te"] is None and seen["size"] == 3000
            assert seen["sha256"] == hashlib.sha256(b"abc" * 1000).hexdigest()
            await pool.close()

    run(go())


async def _blocks(count: int, size: int) -> AsyncIterator[bytes]:
    for i in range(count):
        yield bytes([i % 251]) * size


def _blocks_sha(count: int, size: int) -> str:
    h = hashlib.sha256()
    for i in range(count):
        h.update(bytes([i % 251]) * size)
    return h.hexdigest()


def test_streamed_body_without_length_goes_chunked_and_with_length_goes_raw() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("POST", "/echo", HOST, _blocks(50, 10_000))
            seen = json.loads(await resp.read())
            assert (seen["te"], seen["cl"], seen["size"]) == ("chunked", None, 500_000)
            assert seen["sha256"] == _blocks_sha(50, 10_000)

            resp = await pool.request(
                "PUT", "/echo", HOST, _blocks(50, 10_000), content_length=500_000
            )
            seen = json.loads(await resp.read())
            assert (seen["te"], seen["cl"], seen["size"]) == (None, "500000", 500_000)
            assert seen["method"] == "PUT" and seen["sha256"] == _blocks_sha(50, 10_000)
            await pool.close()

    run(go())


def test_request_body_streaming_waits_for_the_upstream_to_read() -> None:
    """pause_writing is honoured: the body source is not drained into memory."""

    async def go() -> None:
        produced = 0

        async def source() -> AsyncIterator[bytes]:
            nonlocal produced
            for _ in range(64):
                produced += 1 << 20
                yield b"y" * (1 << 20)

        async with aiohttp_upstream() as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            task = asyncio.create_task(pool.request("POST", "/echo?slow", HOST, source()))
            await asyncio.sleep(0.2)  # the upstream sleeps 0.3 s after its first read
            assert produced < 32 << 20, "the whole body was pulled while the upstream slept"
            resp = await task
            seen = json.loads(await resp.read())
            assert seen["size"] == 64 << 20 and produced == 64 << 20
            await pool.close()

    run(go())


def test_head_204_and_304_have_no_body_and_keep_the_connection() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("HEAD", "/hello", HOST)
            assert resp.status == 200 and resp.content_length is None
            assert ("Content-Length", "5") in resp.headers
            assert await resp.read() == b""
            for code in (204, 304):
                resp = await pool.request("GET", f"/status/{code}", HOST)
                assert resp.status == code and await resp.read() == b""
            resp = await pool.request("GET", "/hello", HOST)
            assert await resp.read() == b"hello"
            assert seen.connections == 1
            await pool.close()

    run(go())


def test_chunked_response_is_decoded() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            pool = UpstreamPool("127.0.0.1", port)
            for _ in range(3):
                resp = await pool.request("GET", "/chunked", HOST)
                assert resp.content_length is None
                assert ("Transfer-Encoding", "chunked") in resp.headers
                assert await resp.read() == b"one,two,three"
            assert seen.connections == 1
            await pool.close()

    run(go())


def test_ten_sequential_requests_use_one_connection() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            pool = UpstreamPool("127.0.0.1", port)
            for i in range(10):
                resp = await pool.request("GET", f"/hello?{i}", HOST)
                assert await resp.read() == b"hello"
            assert seen.connections == 1 and pool.idle_count == 1
            await pool.close()

    run(go())


def test_connection_close_prevents_reuse() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/close", HOST)
            assert ("Connection", "close") in resp.headers
            assert await resp.read() == b"bye"
            assert pool.idle_count == 0
            resp = await pool.request("GET", "/hello", HOST)
            assert await resp.read() == b"hello"
            assert seen.connections == 2
            await pool.close()

    run(go())


def test_a_body_not_fully_read_prevents_reuse_but_a_complete_unread_one_does_not() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/big?mib=4", HOST)
            assert resp.content_length == 4 << 20
            await anext(resp.iter_chunks())
            resp.release()  # 4 MiB still on the way: the connection cannot carry another
            assert pool.idle_count == 0

            resp = await pool.request("GET", "/hello", HOST)
            for _ in range(100):  # the 5 bytes are in once the parser saw the message end
                if resp.buffered == 5:
                    break
                await asyncio.sleep(0.01)
            resp.release()  # received whole but never read: the connection is clean
            assert pool.idle_count == 1
            resp = await pool.request("GET", "/hello", HOST)
            assert await resp.read() == b"hello"
            assert seen.connections == 2
            await pool.close()

    run(go())


def test_idle_timeout_discards_the_connection() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            clock = FakeClock()
            pool = UpstreamPool("127.0.0.1", port, idle_timeout=5.0, clock=clock)
            for _ in range(2):
                resp = await pool.request("GET", "/hello", HOST)
                await resp.read()
            assert seen.connections == 1
            clock.advance(4.9)
            resp = await pool.request("GET", "/hello", HOST)
            await resp.read()
            assert seen.connections == 1
            clock.advance(5.1)
            resp = await pool.request("GET", "/hello", HOST)
            await resp.read()
            assert seen.connections == 2 and pool.idle_count == 1
            await pool.close()

    run(go())


def test_at_most_max_idle_connections_are_kept() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            pool = UpstreamPool("127.0.0.1", port, max_idle=2)
            responses = await asyncio.gather(
                *(pool.request("GET", "/hello", HOST) for _ in range(4))
            )
            assert seen.connections == 4
            for resp in responses:
                assert await resp.read() == b"hello"
            assert pool.idle_count == 2
            await pool.close()

    run(go())


def test_100_mib_streams_in_bounded_memory_with_a_slow_consumer() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/big?mib=100", HOST)
            assert resp.content_length == 100 << 20
            total = most = 0
            async for chunk in resp:
                total += len(chunk)
                most = max(most, resp.buffered + len(chunk))
                if total < 8 << 20:
                    await asyncio.sleep(0.001)  # slow for the first 8 MiB
            assert total == 100 << 20 and seen.sent == 100 << 20
            # paused above the high-water mark; one more socket read may land after it
            assert most <= upstream_client._HIGH_WATER + 2 * 256 * 1024
            assert pool.idle_count == 1  # read to the end: back in the pool
            await pool.close()

    run(go())


def test_reading_pauses_under_a_slow_consumer_and_resumes() -> None:
    async def go() -> None:
        async with aiohttp_upstream() as (port, seen):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/big?mib=64", HOST)
            first = await anext(resp.iter_chunks())
            await asyncio.sleep(0.3)  # a consumer that stalls
            assert resp.buffered > upstream_client._HIGH_WATER  # it filled up, then...
            assert resp.buffered <= upstream_client._HIGH_WATER + 2 * 256 * 1024  # ...paused
            assert seen.sent < 32 << 20  # and the upstream is held back by TCP
            rest = 0
            async for chunk in resp:
                rest += len(chunk)
            assert len(first) + rest == 64 << 20
            await pool.close()

    run(go())
