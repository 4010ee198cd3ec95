"""Each limit on a real server over loopback: the status (or the close), the
counter, and that the stand-in upstream never saw the request."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace

import pytest
from hygiene_harness import MAX_BODY, TEST_CONFIG, Client, exchange, guarded_server, request

from stockade.proxy.limits import handler_kwargs, url_limit
from stockade.proxy.settings import ProxyConfig

SLACK = 0.4  # scheduling slack on top of a timeout


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


def body_json(data: bytes) -> dict[str, str]:
    decoded: dict[str, str] = json.loads(data.split(b"\r\n\r\n", 1)[1])
    return decoded


def test_handler_kwargs_are_aiohttps() -> None:
    kwargs = handler_kwargs(TEST_CONFIG)
    assert kwargs["max_line_size"] == url_limit(TEST_CONFIG) == 512
    assert kwargs["max_field_size"] == 1024
    assert kwargs["max_headers"] == 20
    assert kwargs["keepalive_timeout"] == TEST_CONFIG.keepalive_timeout
    assert kwargs["auto_decompress"] is False
    # the request line must fit in max_header_size too
    assert url_limit(ProxyConfig(max_url_length=8190, max_header_size=8190)) == 8190 - 13


@pytest.mark.parametrize(
    ("extra", "status"),
    [(0, 200), (1, 414), (5000, 414)],
    ids=["at the limit", "one over", "far over"],
)
def test_long_url(extra: int, status: int) -> None:
    target = "/" + "a" * (url_limit(TEST_CONFIG) - 1 + extra)

    async def scenario() -> None:
        async with guarded_server() as server:
            result = await exchange(server.port, request(target))
            assert result.statuses == [status], result.data[:200]
            assert result.closed
            if status == 414:
                assert body_json(result.data)["error"] == "url_too_long"
                assert server.recorder.entered == []
                assert server.counters.url_too_long == 1
            else:
                assert len(server.recorder.seen) == 1

    run(scenario)


def test_long_query_counts_in_the_url() -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            result = await exchange(server.port, request("/a?q=" + "x" * 600))
            assert result.statuses == [414]
            assert server.recorder.entered == []

    run(scenario)


@pytest.mark.parametrize(
    ("count", "status"),
    [(20, 200), (21, 431), (500, 431)],
    ids=["at the limit", "one over", "far over"],
)
def test_too_many_headers(count: int, status: int) -> None:
    # Host is one of them
    headers = [(f"X-H{i}", "v") for i in range(count - 1)]

    async def scenario() -> None:
        async with guarded_server() as server:
            result = await exchange(server.port, request("/", headers, close=False))
            assert result.statuses == [status], result.data[:200]
            if status == 431:
                assert result.closed
                assert body_json(result.data)["error"] == "headers_too_large"
                assert server.recorder.entered == []
                assert server.counters.headers_too_large == 1
            else:
                assert len(server.recorder.seen) == 1

    run(scenario)


@pytest.mark.parametrize(
    ("name", "size", "status"),
    [("X-Big", 1024, 200), ("X-Big", 1025, 431), ("X-Big", 100_000, 431), ("X" * 1025, 1, 431)],
    ids=["value at the limit", "value one over", "value far over", "name one over"],
)
def test_huge_header(name: str, size: int, status: int) -> None:
    # aiohttp 3.14 measures a header's name and its value against max_field_size,
    # each on its own (it means to add them, but resets the name's size too early)
    value = "v" * size

    async def scenario() -> None:
        async with guarded_server() as server:
            result = await exchange(server.port, request("/", [(name, value)]))
            assert result.statuses == [status], result.data[:200]
            assert result.closed
            if status == 431:
                assert server.recorder.entered == []
                assert server.counters.headers_too_large == 1
            else:
                assert len(server.recorder.seen) == 1

    run(scenario)


def test_other_malformed_head_is_400_with_json() -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            result = await exchange(server.port, b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            assert result.statuses == [400]
            assert body_json(result.data)["error"] == "bad_request"
            assert server.counters.bad_requests == 1

    run(scenario)


def test_slowloris_head_drip_is_cut_at_header_timeout() -> None:
    timeout = TEST_CONFIG.header_timeout

    async def scenario() -> None:
        async with guarded_server() as server:
            client = await Client.connect(server.port)
            try:
                await client.send(b"GET / HTTP/1.1\r\nHost: x\r\n")
                loop = asyncio.get_running_loop()
                start = loop.time()

                async def drip() -> None:
                    for i in range(100):  # a header line every 0.1 s, for up to 10 s
                        await asyncio.sleep(0.1)
                        client.writer.write(f"X-{i}: a\r\n".encode())

                dripper = asyncio.create_task(drip())
                result = await client.read_until_close(timeout=timeout + 5)
                elapsed = loop.time() - start
                dripper.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await dripper
            finally:
                await client.close()
            assert result.closed
            assert result.statuses == [408]
            assert body_json(result.data)["error"] == "header_timeout"
            assert timeout - 0.05 <= elapsed <= timeout + SLACK
            assert server.recorder.entered == []
            assert server.counters.header_timeouts == 1

    run(scenario)


def test_silent_connection_is_closed_at_header_timeout() -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            client = await Client.connect(server.port)
            try:
                result = await client.read_until_close(timeout=5)
            finally:
                await client.close()
            assert result.closed and result.data == b""
            assert result.elapsed <= TEST_CONFIG.header_timeout + SLACK
            assert server.counters.idle_connections_closed == 1
            assert server.counters.header_timeouts == 0

    run(scenario)


def test_header_timeout_runs_from_the_first_byte_of_a_later_request() -> None:
    """Idle keep-alive time does not count; a slow second head does."""
    timeout = TEST_CONFIG.header_timeout

    async def scenario() -> None:
        async with guarded_server() as server:
            client = await Client.connect(server.port)
            try:
                await client.send(request("/first", close=False))
                assert (await client.read_response()).startswith(b"HTTP/1.1 200")
                # idle longer than header_timeout, shorter than keepalive_timeout
                await asyncio.sleep(timeout + 0.3)
                await client.send(b"GET /second HTTP/1.1\r\n")
                result = await client.read_until_close(timeout=5)
            finally:
                await client.close()
            assert result.statuses == [408]
            assert timeout - 0.05 <= result.elapsed <= timeout + SLACK
            assert [s["path"] for s in server.recorder.seen] == ["/first"]

    run(scenario)


def test_head_in_pieces_within_the_timeout_and_pipelining_pass() -> None:
    config = replace(TEST_CONFIG, header_timeout=0.3, body_idle_timeout=2.0)

    async def scenario() -> None:
        async with guarded_server(config) as server:
            client = await Client.connect(server.port)
            try:
                await client.send(b"GET /a HTTP/1.1\r\n", b"Host: x\r\n", b"\r\n", gap=0.1)
                assert (await client.read_response()).startswith(b"HTTP/1.1 200")
                await client.send(request("/b", close=False) + request("/c", close=False))
                assert (await client.read_response()).startswith(b"HTTP/1.1 200")
                assert (await client.read_response()).startswith(b"HTTP/1.1 200")
                # a body arriving slower than header_timeout is not a slow head
                raw = request("/d", method="POST", body=b"x" * 10, close=False)
                await client.send(raw[:-5], raw[-5:], gap=config.header_timeout + 0.3)
                assert (await client.read_response()).startswith(b"HTTP/1.1 200")
            finally:
                await client.close()
            assert [s["path"] for s in server.recorder.seen] == ["/a", "/b", "/c", "/d"]
            assert server.counters.header_timeouts == 0

    run(scenario)


def test_keepalive_idle_is_closed_after_keepalive_timeout() -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            client = await Client.connect(server.port)
            try:
                await client.send(request("/", close=False))
                assert (await client.read_response()).startswith(b"HTTP/1.1 200")
                result = await client.read_until_close(timeout=5)
            finally:
                await client.close()
            assert result.closed and result.data == b""
            assert TEST_CONFIG.keepalive_timeout - 0.1 <= result.elapsed
            assert result.elapsed <= TEST_CONFIG.keepalive_timeout + 1.0 + SLACK
            assert server.counters.header_timeouts == 0

    run(scenario)


def test_slow_body_is_408() -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            head = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
            client = await Client.connect(server.port)
            try:
                await client.send(head + b"x" * 10)
                result = await client.read_until_close(timeout=5)
            finally:
                await client.close()
            assert result.statuses == [408]
            assert b"body_timeout" in result.data
            assert result.closed  # after aiohttp's lingering read of the rest (LINGERING_TIME)
            assert result.answered is not None
            assert TEST_CONFIG.body_idle_timeout - 0.05 <= result.answered
            assert result.answered <= TEST_CONFIG.body_idle_timeout + SLACK
            assert server.recorder.seen == []

    run(scenario)


def test_body_over_the_limit_declared_is_413() -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            raw = request("/upload", method="POST", body=b"x" * (MAX_BODY + 1))
            result = await exchange(server.port, raw)
            assert result.statuses == [413]
            assert server.recorder.seen == []

    run(scenario)


def test_body_over_the_limit_chunked_is_413() -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            head = b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            chunk = b"%x\r\n%s\r\n" % (400, b"x" * 400)
            result = await exchange(server.port, head + chunk * 3 + b"0\r\n\r\n")
            assert result.statuses == [413]
            assert server.recorder.seen == []
            # at the limit is fine
            result = await exchange(
                server.port, head + b"%x\r\n%s\r\n0\r\n\r\n" % (MAX_BODY, b"x" * MAX_BODY)
            )
            assert result.statuses == [200]
            assert len(server.recorder.seen) == 1

    run(scenario)


def test_max_connections_per_worker() -> None:
    config = replace(TEST_CONFIG, max_connections=3, header_timeout=10, keepalive_timeout=10)

    async def scenario() -> None:
        async with guarded_server(config) as server:
            held = [await Client.connect(server.port) for _ in range(3)]
            try:
                for client in held:
                    await client.send(request("/held", close=False))
                    assert (await client.read_response()).startswith(b"HTTP/1.1 200")
                assert server.counters.connections_active == 3
                # the fourth is answered 503 and closed before it sends anything
                extra = await exchange(server.port)
                assert extra.statuses == [503] and extra.closed
                assert b"too_many_connections" in extra.data
                # and one that sends a request at once gets no further
                extra = await exchange(server.port, request("/refused"))
                assert extra.closed
                assert extra.statuses in ([503], [])  # a reset may beat the answer
                assert server.counters.connections_refused == 2
                # a slot frees up when a connection closes
                await held.pop().close()
                for _ in range(50):
                    if server.counters.connections_active == 2:
                        break
                    await asyncio.sleep(0.02)
                result = await exchange(server.port, request("/after"))
                assert result.statuses == [200]
            finally:
                for client in held:
                    await client.close()
            assert [s["path"] for s in server.recorder.seen] == ["/held"] * 3 + ["/after"]

    run(scenario)
