"""Smuggling gadgets on the wire: each ends in 400 and a closed connection, and
nothing reaches the stand-in upstream.

PARSER cases are refused by aiohttp's C parser (llhttp) itself: the handler is
never called, with aiohttp's defaults as well as the gateway's settings.
CHECK cases get through llhttp and are refused by framing_problem.
LEGAL cases are valid framings that the parser and the check read alike; they
must pass, with the body the client meant.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
from hygiene_harness import TEST_CONFIG, Client, exchange, guarded_server, plain_server

POST = b"POST /api HTTP/1.1\r\nHost: gateway.test\r\n"
CHUNKED = POST + b"Transfer-Encoding: chunked\r\n"

PARSER: dict[str, bytes] = {
    "CL+TE": POST + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE+CL": CHUNKED + b"Content-Length: 5\r\n\r\n0\r\n\r\n",
    "CL+TE on GET": b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "CL twice equal": POST + b"Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "CL twice different": POST + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "CL list": POST + b"Content-Length: 5, 5\r\n\r\nhello",
    "CL +5": POST + b"Content-Length: +5\r\n\r\nhello",
    "CL -5": POST + b"Content-Length: -5\r\n\r\nhello",
    "CL 5 5": POST + b"Content-Length: 5 5\r\n\r\nhello",
    "CL vertical-tab 5": POST + b"Content-Length: \x0b5\r\n\r\nhello",
    "CL form-feed 5": POST + b"Content-Length: \x0c5\r\n\r\nhello",
    "CL 0x5": POST + b"Content-Length: 0x5\r\n\r\nhello",
    "CL empty": POST + b"Content-Length: \r\n\r\nhello",
    "CL 2^64": POST + b"Content-Length: 18446744073709551616\r\n\r\nhello",
    "CL space before colon": POST + b"Content-Length : 5\r\n\r\nhello",
    "TE chunked, chunked": POST + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
    "TE chunked twice": CHUNKED + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE gzip then chunked lines": POST + b"Transfer-Encoding: gzip\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "TE chunked, gzip": POST + b"Transfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    "TE identity": POST + b"Transfer-Encoding: identity\r\n\r\n",
    "TE xchunked": POST + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "TE chunked;q=1": POST + b"Transfer-Encoding: chunked;q=1\r\n\r\n0\r\n\r\n",
    "TE vertical-tab": POST + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "TE space before colon": POST + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-Foo: a\r\n b\r\n\r\n",
    "obs-fold tab": b"GET / HTTP/1.1\r\nHost: x\r\nX-Foo: a\r\n\tb\r\n\r\n",
    "obs-fold TE": POST + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "leading whitespace line": b"GET / HTTP/1.1\r\n Host: x\r\n\r\n",
    "bare CR in value": b"GET / HTTP/1.1\r\nHost: x\r\nX-Foo: a\rb\r\n\r\n",
    "LF-only head": b"GET / HTTP/1.1\nHost: x\nX-Foo: a\n\n",
    "NUL in value": b"GET / HTTP/1.1\r\nHost: x\r\nX-Foo: a\x00b\r\n\r\n",
    "NUL in target": b"GET /a\x00b HTTP/1.1\r\nHost: x\r\n\r\n",
    "Host twice": b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    "bare CR in chunk extension": CHUNKED + b"\r\n5;a=b\rc\r\nhello\r\n0\r\n\r\n",
    "LF-only chunk line": CHUNKED + b"\r\n5;a=b\nhello\r\n0\r\n\r\n",
    "chunk size 0x5": CHUNKED + b"\r\n0x5\r\nhello\r\n0\r\n\r\n",
    "chunk size with space": CHUNKED + b"\r\n5 \r\nhello\r\n0\r\n\r\n",
    "chunk data overrun": CHUNKED + b"\r\n5\r\nhelloX0\r\n\r\n",
    "CL in trailer": CHUNKED + b"\r\n5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n",
}

CHECK: dict[str, tuple[bytes, str]] = {
    "TE gzip, chunked": (
        POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        "unsupported_transfer_encoding",
    ),
    "TE identity, chunked": (
        POST + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        "unsupported_transfer_encoding",
    ),
    "TE , chunked": (
        POST + b"Transfer-Encoding: , chunked\r\n\r\n0\r\n\r\n",
        "unsupported_transfer_encoding",
    ),
    "TE empty": (POST + b"Transfer-Encoding: \r\n\r\n", "unsupported_transfer_encoding"),
    "TE on HTTP/1.0": (
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "transfer_encoding_http10",
    ),
    "CL 2^63": (POST + b"Content-Length: 9223372036854775808\r\n\r\nhello", "bad_content_length"),
    "HTTP/0.9": (b"GET /\r\n\r\n", "unsupported_http_version"),
    "HTTP/2.0 request line": (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "unsupported_http_version"),
}

# Whitespace around a field value is not part of it (RFC 9110 5.5), so "  5" is 5.
LEGAL: dict[str, tuple[bytes, bytes]] = {
    "CL 5": (POST + b"Content-Length: 5\r\n\r\nhello", b"hello"),
    "CL ' 5' (extra OWS)": (POST + b"Content-Length:  5\r\n\r\nhello", b"hello"),
    "CL tab 5": (POST + b"Content-Length:\t5\r\n\r\nhello", b"hello"),
    "CL no space": (POST + b"Content-Length:5\r\n\r\nhello", b"hello"),
    "CL trailing space": (POST + b"Content-Length: 5 \r\n\r\nhello", b"hello"),
    "CL 005": (POST + b"Content-Length: 005\r\n\r\nhello", b"hello"),
    "TE chunked": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
    "TE Chunked": (POST + b"Transfer-Encoding: Chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", b"hello"),
    "chunk extension": (CHUNKED + b"\r\n5;a=b\r\nhello\r\n0\r\n\r\n", b"hello"),
    "trailer": (CHUNKED + b"\r\n5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", b"hello"),
    "GET with a body": (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    "HTTP/1.0 with CL": (b"POST / HTTP/1.0\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
}


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())  # type: ignore[arg-type]


@pytest.mark.parametrize("raw", PARSER.values(), ids=PARSER.keys())
def test_parser_refuses(raw: bytes) -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            result = await exchange(server.port, raw)
            assert result.statuses == [400], result.data
            assert result.closed
            assert server.recorder.entered == []
            assert server.counters.bad_requests == 1
        # and it is llhttp that refuses it: aiohttp's defaults, no check of ours
        async with plain_server() as plain:
            result = await exchange(plain.port, raw)
            assert result.statuses == [400], result.data
            assert plain.recorder.entered == []

    run(scenario)


@pytest.mark.parametrize(("raw", "reason"), CHECK.values(), ids=CHECK.keys())
def test_check_refuses(raw: bytes, reason: str) -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            result = await exchange(server.port, raw)
            assert result.statuses == [400], result.data
            assert reason.encode() in result.data
            assert result.closed
            assert server.recorder.seen == []
        # the parser alone lets it through to the handler
        async with guarded_server(check_framing=False) as unchecked:
            client = await Client.connect(unchecked.port)
            try:
                await client.send(raw)
                await client.read_until_close(timeout=1.0)
            finally:
                await client.close()
            assert len(unchecked.recorder.entered) == 1

    run(scenario)


@pytest.mark.parametrize(("raw", "body"), LEGAL.values(), ids=LEGAL.keys())
def test_legal_framing_passes(raw: bytes, body: bytes) -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            client = await Client.connect(server.port)
            try:
                await client.send(raw)
                response = await client.read_response()
            finally:
                await client.close()
            assert response.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), response
            assert [s["body"] for s in server.recorder.seen] == [body]

    run(scenario)


def test_bad_chunk_after_the_head_fails_the_body_at_once() -> None:
    """The head arrives first and the handler starts; the broken chunk comes later.

    aiohttp alone leaves that body hanging until a timeout and queues a second,
    unsolicited 400; GuardedRequestHandler fails the body, so the handler
    answers one 400 at once, and closes.
    """

    async def scenario() -> None:
        async with guarded_server() as server:
            result = await exchange(
                server.port, CHUNKED + b"\r\n", b"5;a=b\rc\r\nhello\r\n0\r\n\r\n", gap=0.1
            )
            assert result.statuses == [400], result.data
            assert b"bad_body" in result.data
            assert result.closed
            assert result.elapsed < TEST_CONFIG.body_idle_timeout
            assert len(server.recorder.entered) == 1
            assert server.recorder.seen == []
            assert server.counters.bad_bodies == 1

    run(scenario)


def test_pipelined_request_after_a_refused_one_is_not_read() -> None:
    async def scenario() -> None:
        async with guarded_server() as server:
            smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
            raw = POST + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n" + smuggled
            result = await exchange(server.port, raw)
            assert result.statuses == [400]
            assert result.closed
            assert [e["target"] for e in server.recorder.entered] == ["/api"]
            assert server.recorder.seen == []

    run(scenario)
