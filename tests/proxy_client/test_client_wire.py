"""The upstream client against scripted servers: exact bytes, misbehaviour, retries, timeouts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from client_harness import Tap, raw_upstream, read_request, reply, run

from stockade.proxy.upstream_client import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)

HOST = [("Host", "upstream.test")]


async def _parts(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def _read_all(reader: Tap) -> None:
    while await reader.read(65536):
        pass


def test_request_head_and_bodies_are_framed_exactly() -> None:
    async def one_answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await _read_all(reader)  # the client closes after the answer

    async def go() -> None:
        async with raw_upstream(one_answer) as (port, received):
            pool = UpstreamPool("127.0.0.1", port)
            cases = [
                (None, None),
                (b"hello", None),
                (_parts(b"ab", b"", b"cdefghijklmnopq"), None),
                (_parts(b"ab", b"cde"), 5),
            ]
            for body, length in cases:
                resp = await pool.request(
                    "POST", "/p?q=1", [*HOST, ("X-A", "1")], body, content_length=length
                )
                resp.release()
            await pool.close()
            await asyncio.sleep(0.05)
        head = b"POST /p?q=1 HTTP/1.1\r\nHost: upstream.test\r\nX-A: 1\r\n"
        assert received == [
            head + b"\r\n",
            head + b"Content-Length: 5\r\n\r\nhello",
            head
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"2\r\nab\r\nf\r\ncdefghijklmnopq\r\n0\r\n\r\n",
            head + b"Content-Length: 5\r\n\r\nabcde",
        ]

    run(go())


def test_streamed_body_must_match_its_content_length() -> None:
    async def swallow(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(swallow) as (port, received):
            pool = UpstreamPool("127.0.0.1", port)
            with pytest.raises(UpstreamError, match="not the 10 of its Content-Length"):
                await pool.request("POST", "/", HOST, _parts(b"abc"), content_length=10)
            with pytest.raises(UpstreamError, match="longer than its Content-Length"):
                await pool.request("POST", "/", HOST, _parts(b"abc", b"defg"), content_length=5)
            await pool.close()
            await asyncio.sleep(0.05)
        assert received[1].endswith(b"Content-Length: 5\r\n\r\nabc")  # the excess never left

    run(go())


def test_cr_or_lf_in_a_header_or_target_is_refused() -> None:
    async def go() -> None:
        pool = UpstreamPool("127.0.0.1", 9)
        for target, headers in [
            ("/", [("X-A", "1\r\nX-Injected: 1")]),
            ("/", [("X-A\n", "1")]),
            ("/ HTTP/1.1\r\n\r\nGET /", HOST),
        ]:
            with pytest.raises(ValueError, match="CR or LF"):
                await pool.request("GET", target, headers)
        await pool.close()

    run(go())


def test_close_delimited_response_body_ends_with_the_connection() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nsome ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"body")

    async def go() -> None:
        async with raw_upstream(answer) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/", HOST)
            assert resp.content_length is None and resp.headers == [("X-A", "1")]
            assert await resp.read() == b"some body"
            assert pool.idle_count == 0
            await pool.close()

    run(go())


def test_interim_100_continue_is_skipped() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + reply(b"final"))
        await read_request(reader)
        writer.write(reply(b"again"))
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(answer) as (port, received):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("POST", "/", [*HOST, ("Expect", "100-continue")], b"x")
            assert (resp.status, resp.headers) == (200, [("Content-Length", "5")])
            assert await resp.read() == b"final"
            resp = await pool.request("GET", "/", HOST)
            assert await resp.read() == b"again"
            assert len(received) == 1
            await pool.close()

    run(go())


def test_head_response_with_stray_body_bytes_is_not_reused() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"should not be here"))

    async def go() -> None:
        async with raw_upstream(answer) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("HEAD", "/", HOST)
            assert resp.status == 200 and await resp.read() == b""
            assert pool.idle_count == 0
            await pool.close()

    run(go())


@pytest.mark.parametrize(
    "garbage",
    [b"HTTP/1.1 2OO OK\r\n\r\n", b"SSH-2.0-OpenSSH\r\n", b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n"],
)
def test_malformed_response_head_is_an_upstream_error(garbage: bytes) -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(garbage)
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(answer) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            with pytest.raises(UpstreamError, match="malformed response"):
                await pool.request("GET", "/", HOST)
            await pool.close()

    run(go())


def test_malformed_chunk_mid_body_raises_from_the_iterator_and_closes() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"zz\r\nnope\r\n")
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(answer) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/", HOST)
            chunks = []
            with pytest.raises(UpstreamError, match="malformed response"):
                async for chunk in resp:
                    chunks.append(chunk)
            assert chunks == [b"abc"] and pool.idle_count == 0
            resp.release()
            await pool.close()

    run(go())


def test_connection_reset_mid_body_raises_from_the_iterator() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST

    async def go() -> None:
        async with raw_upstream(answer) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/", HOST)
            with pytest.raises(UpstreamError, match="reading the body"):
                await resp.read()
            assert pool.idle_count == 0
            await pool.close()

    run(go())


def test_dead_reused_connection_is_retried_once_for_a_replayable_request() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"first"))
        await reader.readuntil(b"\r\n\r\n")  # the second request: hang up without answering

    async def go() -> None:
        async with raw_upstream(answer) as (port, received):
            pool = UpstreamPool("127.0.0.1", port)
            for body, expect in [(None, 2), (b"replayable", 4)]:
                resp = await pool.request("GET", "/", HOST)
                assert await resp.read() == b"first"
                resp = await pool.request("POST", "/", HOST, body)  # reused, dropped, retried
                assert await resp.read() == b"first"
                assert len(received) == expect
            await pool.close()

    run(go())


def test_streamed_body_on_a_dead_reused_connection_is_not_retried() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"first"))
        await reader.readuntil(b"\r\n\r\n")

    async def go() -> None:
        async with raw_upstream(answer) as (port, received):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/", HOST)
            await resp.read()
            with pytest.raises(UpstreamError, match="closed the connection"):
                await pool.request("POST", "/", HOST, _parts(b"once", b"only"))
            assert len(received) == 1
            await pool.close()

    run(go())


def test_server_closing_an_idle_connection_is_not_reused() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"bye later"))  # keep-alive by the headers, then closes anyway

    async def go() -> None:
        async with raw_upstream(answer) as (port, received):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/", HOST)
            assert await resp.read() == b"bye later"
            assert pool.idle_count == 1
            await asyncio.sleep(0.05)  # the close reaches the idle connection
            resp = await pool.request("GET", "/", HOST)
            assert await resp.read() == b"bye later"
            assert len(received) == 2
            await pool.close()

    run(go())


def test_bytes_sent_while_idle_discard_the_connection() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"ok"))
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(reply(b"unasked"))
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(answer) as (port, received):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/", HOST)
            assert await resp.read() == b"ok"
            await asyncio.sleep(0.1)
            resp = await pool.request("GET", "/", HOST)
            assert await resp.read() == b"ok"
            assert len(received) == 2
            await pool.close()

    run(go())


def test_connect_refused_is_a_connect_error() -> None:
    async def go() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # bound, not listening: refused
            pool = UpstreamPool("127.0.0.1", port)
            with pytest.raises(UpstreamConnectError) as caught:
                await pool.request("GET", "/", HOST)
            assert not isinstance(caught.value, UpstreamTimeout)
            await pool.close()

    run(go())


def test_connect_timeout_is_both_a_connect_error_and_a_timeout() -> None:
    async def go() -> None:
        # A listener that never accepts, its backlog filled: the kernel drops further SYNs.
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            fillers = []
            try:
                for _ in range(4):
                    s = socket.socket()
                    s.setblocking(False)
                    fillers.append(s)
                    s.connect_ex(("127.0.0.1", port))
                pool = UpstreamPool("127.0.0.1", port)
                with pytest.raises(UpstreamConnectTimeout) as caught:
                    await pool.request("GET", "/", HOST, connect_timeout=0.3)
                assert isinstance(caught.value, UpstreamConnectError)
                assert isinstance(caught.value, UpstreamTimeout)
                await pool.close()
            finally:
                for s in fillers:
                    s.close()

    run(go())


def test_response_head_timeout() -> None:
    async def silent(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(silent) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            with pytest.raises(UpstreamTimeout, match="no response head"):
                await pool.request("GET", "/", HOST, read_timeout=0.2)
            await pool.close()

    run(go())


def test_body_idle_timeout_mid_stream() -> None:
    async def stall(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        for _ in range(3):  # a byte every 0.1 s keeps a 0.25 s idle timer alive
            await asyncio.sleep(0.1)
            writer.write(b"d")
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(stall) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/", HOST, read_timeout=0.25)
            got = b""
            with pytest.raises(UpstreamTimeout, match="no body bytes"):
                async for chunk in resp:
                    got += chunk
            assert got == b"abcddd" and pool.idle_count == 0
            await pool.close()

    run(go())


def test_upgrade_is_refused() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n")
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(answer) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            with pytest.raises(UpstreamError, match="upgrades are not supported"):
                await pool.request("GET", "/", HOST)
            await pool.close()

    run(go())


def test_an_early_answer_stops_the_request_body_and_the_connection_is_not_reused() -> None:
    async def refuse(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        await asyncio.sleep(5)  # and never reads the body

    async def go() -> None:
        produced = 0

        async def source() -> AsyncIterator[bytes]:
            nonlocal produced
            for _ in range(64):
                produced += 1 << 20
                yield b"z" * (1 << 20)

        async with raw_upstream(refuse) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("POST", "/", HOST, source(), read_timeout=2.0)
            assert resp.status == 413 and await resp.read() == b""
            assert produced < 32 << 20 and pool.idle_count == 0
            await pool.close()

    run(go())


def test_a_second_response_in_the_same_read_discards_the_connection() -> None:
    async def answer(reader: Tap, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply(b"one") + reply(b"two"))
        await _read_all(reader)

    async def go() -> None:
        async with raw_upstream(answer) as (port, _):
            pool = UpstreamPool("127.0.0.1", port)
            resp = await pool.request("GET", "/", HOST)
            assert await resp.read() == b"one"
            assert pool.idle_count == 0
            await pool.close()

    run(go())
