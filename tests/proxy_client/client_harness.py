"""Servers on 127.0.0.1 for the upstream client tests: a real aiohttp app and raw scripted ones."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager, suppress
from typing import Any

from aiohttp import web

# Every test body runs under this bound, well inside pytest's per-test timeout.
TEST_TIMEOUT = 60.0


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(TEST_TIMEOUT):
            await coro

    asyncio.run(bounded())


class Seen:
    """What the aiohttp upstream saw: client ports (one per connection), bytes sent."""

    def __init__(self) -> None:
        self.ports: set[int] = set()
        self.sent = 0

    @property
    def connections(self) -> int:
        return len(self.ports)


SEEN = web.AppKey("seen", Seen)


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello", headers={"X-Path": request.path_qs})


async def _echo(request: web.Request) -> web.Response:
    """Reads the body (slowly if ?slow) and tells how it arrived."""
    hasher = hashlib.sha256()
    size = 0
    async for chunk in request.content.iter_any():
        if "slow" in request.query and not size:
            await asyncio.sleep(0.3)
        hasher.update(chunk)
        size += len(chunk)
    return web.json_response(
        {
            "size": size,
            "sha256": hasher.hexdigest(),
            "te": request.headers.get("Transfer-Encoding"),
            "cl": request.headers.get("Content-Length"),
            "method": request.method,
        }
    )


async def _status(request: web.Request) -> web.Response:
    code = int(request.match_info["code"])
    return web.Response(status=code, headers={"ETag": '"v1"'})


async def _chunked(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    response.enable_chunked_encoding()
    await response.prepare(request)
    for piece in (b"one,", b"two,", b"three"):
        await response.write(piece)
    await response.write_eof()
    return response


async def _big(request: web.Request) -> web.StreamResponse:
    """?mib=N: N MiB in 1 MiB writes, each waiting for the socket to drain."""
    seen = request.app[SEEN]
    mib = int(request.query["mib"])
    response = web.StreamResponse()
    response.content_length = mib << 20
    await response.prepare(request)
    block = b"x" * (1 << 20)
    for _ in range(mib):
        await response.write(block)
        seen.sent += len(block)
    await response.write_eof()
    return response


async def _close(request: web.Request) -> web.Response:
    response = web.Response(text="bye")
    response.force_close()
    return response


@web.middleware
async def _count(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if peer is not None:
        request.app[SEEN].ports.add(peer[1])
    return await handler(request)


@asynccontextmanager
async def aiohttp_upstream() -> AsyncIterator[tuple[int, Seen]]:
    """An aiohttp server on 127.0.0.1; yields its port and what it saw."""
    app = web.Application(middlewares=[_count])
    seen = Seen()
    app[SEEN] = seen
    app.router.add_get("/hello", _hello)
    app.router.add_post("/echo", _echo)
    app.router.add_put("/echo", _echo)
    app.router.add_get("/status/{code}", _status)
    app.router.add_get("/chunked", _chunked)
    app.router.add_get("/big", _big)
    app.router.add_get("/close", _close)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        server = site._server
        assert isinstance(server, asyncio.Server)
        yield server.sockets[0].getsockname()[1], seen
    finally:
        await runner.cleanup()


Handler = Callable[["Tap", asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_upstream(handler: Handler) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A scripted server; yields its port and the raw bytes each connection sent.

    The handler gets one call per connection; the harness closes the writer after.
    """
    received: list[bytes] = []
    tasks: set[asyncio.Task[Any]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        received.append(b"")
        try:
            await handler(Tap(reader, received, len(received) - 1), writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()
        for task in tasks:  # handlers still waiting (the timeout tests' silent servers)
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


class Tap:
    """A StreamReader stand-in that records every byte read into received[index]."""

    def __init__(self, reader: asyncio.StreamReader, received: list[bytes], index: int) -> None:
        self._reader = reader
        self._received = received
        self._index = index

    def _keep(self, data: bytes) -> bytes:
        self._received[self._index] += data
        return data

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        return self._keep(await self._reader.readuntil(separator))

    async def readexactly(self, n: int) -> bytes:
        return self._keep(await self._reader.readexactly(n))

    async def read(self, n: int = -1) -> bytes:
        return self._keep(await self._reader.read(n))


async def read_request(reader: Tap) -> bytes:
    """One request head (a raw server's requests here carry a Content-Length body at most)."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def reply(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)
