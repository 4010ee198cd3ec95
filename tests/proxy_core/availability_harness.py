"""A backend that counts its concurrent requests, and a raw HTTP/1.1 client, for the tests
of upstream availability (client aborts, slow bodies, maxconn queues, Expect)."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from stockade.clock import SystemClock
from stockade.proxy.app import Gateway
from stockade.proxy.settings import ProxyConfig


@dataclass
class Backend:
    """An upstream on 127.0.0.1 that records each request and how many ran at once.

    GET /slow waits `delay` seconds; GET /stream sends `stream_chunks` chunks of 64 KiB
    with `stream_pause` between them; anything else reads the whole body and answers
    with its size. A body or response cut short (the gateway closed the connection)
    is counted in `cut_bodies` or `cut_responses`, never raised.
    """

    delay: float = 0.0
    stream_chunks: int = 0
    stream_pause: float = 0.0
    active: int = 0
    peak: int = 0
    seen: list[dict[str, Any]] = field(default_factory=list)
    cut_bodies: int = 0
    cut_responses: int = 0
    runner: web.AppRunner | None = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            size = 0
            try:
                async for chunk in request.content.iter_any():
                    size += len(chunk)
            except Exception:  # the gateway hung up mid-body
                self.cut_bodies += 1
                return web.Response(status=400)
            self.seen.append(
                {
                    "method": request.method,
                    "path": request.path,
                    "headers": dict(request.headers),
                    "body_size": size,
                }
            )
            if request.path == "/slow":
                await asyncio.sleep(self.delay)
            if request.path == "/stream":
                response = web.StreamResponse()
                response.content_length = self.stream_chunks * 65536
                await response.prepare(request)
                try:
                    for _ in range(self.stream_chunks):
                        await response.write(b"x" * 65536)
                        await asyncio.sleep(self.stream_pause)
                    await response.write_eof()
                except ConnectionError:  # the gateway hung up mid-response
                    self.cut_responses += 1
                return response
            return web.json_response({"body_size": size})
        finally:
            self.active -= 1

    async def start(self) -> None:
        app = web.Application(client_max_size=2**31)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


class Raw:
    """One client connection that writes and reads bytes as the test says."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, url: str) -> Raw:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def head(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """The next response head: status, headers (lowercase names), the raw head."""
        async with asyncio.timeout(timeout):
            raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return status, headers, raw

    async def response(self, timeout: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """The next final response (no interim one expected): status, headers, body."""
        status, headers, _ = await self.head(timeout)
        async with asyncio.timeout(timeout):
            body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body

    async def at_eof(self, timeout: float = 5.0) -> bool:
        """True when the gateway closes the connection (reads and drops anything before)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
        return True

    def abort(self, *, reset: bool) -> None:
        """Hang up: a FIN, or with reset=True an RST (SO_LINGER 0), as a killed client."""
        sock = self.writer.transport.get_extra_info("socket")
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort() if reset else self.writer.close()

    def close(self) -> None:
        self.writer.close()


@asynccontextmanager
async def connected(url: str) -> AsyncIterator[Raw]:
    raw = await Raw.connect(url)
    try:
        yield raw
    finally:
        raw.close()
        with suppress(ConnectionError):
            await raw.writer.wait_closed()


def request_head(method: str, path: str, *headers: str, length: int | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: api.test", *headers]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@asynccontextmanager
async def running_gateway(
    config: ProxyConfig, *, cancel_on_hangup: bool = True
) -> AsyncIterator[tuple[str, Gateway]]:
    """proxy_harness.gateway; cancel_on_hangup=False turns off aiohttp's handler
    cancellation, to exercise what the gateway does when a write or a read finds the
    client gone before the cancellation does."""
    gw = Gateway(config, SystemClock())
    await gw.start()
    server = gw.server("http")
    server.handler_cancellation = cancel_on_hangup
    runner = web.ServerRunner(server)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", gw
    finally:
        await runner.cleanup()
        await gw.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll until `condition` holds (an event to wait for, not a window to sit out)."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def access_lines(gw: Gateway, log: Path, count: int, timeout: float = 10.0) -> list[Any]:
    """The access log once it has `count` lines (flushing it rather than waiting a second)."""
    deadline = time.monotonic() + timeout
    while True:
        gw.access_log.flush()
        lines = [json.loads(x) for x in log.read_text().splitlines() if x.strip()]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.02)


def sample(gw: Gateway, name: str, **labels: str) -> float:
    """A metric's value in the gateway's registry, after a flush of the pending counts."""
    gw.metrics.flush()
    value = gw.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
