"""A guarded aiohttp server on loopback and a raw TCP client for the hygiene tests.

The server is what the gateway's workers run (GuardedAppRunner with
handler_kwargs), with one handler standing in for the pipeline and the
upstream: it applies the framing check, the path normalization and the body
limits, and records in `seen` only the requests that pass all of them, i.e.
the ones that would have reached an upstream. `entered` records every request
the handler was called for at all (the parser let it through).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from stockade.proxy.limits import (
    BodyError,
    GuardedAppRunner,
    GuardedServer,
    LimitCounters,
    bounded_body,
    content_length_too_large,
    handler_kwargs,
)
from stockade.proxy.normalize import BadPath, normalize_path
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.smuggling import framing_problem

MAX_BODY = 1000

# Small limits so each test hits them quickly.
TEST_CONFIG = ProxyConfig(
    max_header_size=1024,
    max_headers=20,
    max_url_length=512,
    header_timeout=0.5,
    body_idle_timeout=0.5,
    keepalive_timeout=1.5,
    max_connections=50,
)


@dataclass
class Recorder:
    config: ProxyConfig = TEST_CONFIG
    check_framing: bool = True
    entered: list[dict[str, Any]] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.entered.append({"method": request.method, "target": request.raw_path})
        if self.check_framing:
            problem = framing_problem(request.raw_headers, version=request.version)
            if problem is not None:
                return refuse(400, problem)
        try:
            path = normalize_path(request.raw_path.split("?", 1)[0])
        except BadPath as exc:
            return refuse(400, exc.reason)
        if content_length_too_large(request, MAX_BODY):
            return refuse(413, "body_too_large")
        body = bytearray()
        try:
            async for chunk in bounded_body(
                request.content, MAX_BODY, self.config.body_idle_timeout
            ):
                body += chunk
        except BodyError as exc:
            return refuse(exc.status, exc.reason)
        self.seen.append({"method": request.method, "path": path, "body": bytes(body)})
        return web.json_response({"path": path, "body_size": len(body)})


def refuse(status: int, reason: str) -> web.Response:
    response = web.json_response({"error": reason}, status=status)
    response.force_close()  # after a refusal the rest of the stream is not trusted
    return response


@dataclass
class Running:
    port: int
    recorder: Recorder
    counters: LimitCounters
    runner: web.BaseRunner


@asynccontextmanager
async def guarded_server(
    config: ProxyConfig = TEST_CONFIG, *, check_framing: bool = True
) -> AsyncIterator[Running]:
    recorder = Recorder(config, check_framing)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    counters = LimitCounters()
    runner = GuardedAppRunner(
        app, config, counters, access_log=None, shutdown_timeout=1.0, **handler_kwargs(config)
    )
    await runner.setup()
    assert isinstance(runner.server, GuardedServer)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Running(port, recorder, counters, runner)
    finally:
        await runner.cleanup()


@asynccontextmanager
async def plain_server() -> AsyncIterator[Running]:
    """aiohttp's own server with default settings and no framing check: the parser alone."""
    recorder = Recorder(check_framing=False)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", recorder.handle)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield Running(runner.addresses[0][1], recorder, LimitCounters(), runner)
    finally:
        await runner.cleanup()


@dataclass
class Exchange:
    data: bytes  # everything received until the server closed or the wait ended
    closed: bool  # the server closed the connection (EOF or reset)
    elapsed: float  # from the last byte sent until close (or the end of the wait)
    answered: float | None  # from the last byte sent until the first byte received

    @property
    def statuses(self) -> list[int]:
        """The status of every response in `data` (split on status lines)."""
        out = []
        for line in self.data.split(b"\r\n"):
            if line.startswith(b"HTTP/") and line.count(b" ") >= 2:
                out.append(int(line.split(b" ")[1]))
        return out

    @property
    def status(self) -> int | None:
        statuses = self.statuses
        return statuses[0] if statuses else None


class Client:
    """A raw TCP connection to the server, with bounded waits."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> Client:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        return cls(reader, writer)

    async def send(self, *parts: bytes, gap: float = 0.0) -> None:
        for i, part in enumerate(parts):
            if i and gap:
                await asyncio.sleep(gap)
            self.writer.write(part)
            await self.writer.drain()

    async def read_until_close(self, timeout: float = 5.0) -> Exchange:
        start = time.monotonic()
        data = bytearray()
        closed = False
        answered = None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    chunk = await self.reader.read(65536)
                    if not chunk:
                        closed = True
                        break
                    if answered is None:
                        answered = time.monotonic() - start
                    data += chunk
        except TimeoutError:
            pass
        except ConnectionResetError:
            closed = True
        return Exchange(bytes(data), closed, time.monotonic() - start, answered)

    async def read_response(self, timeout: float = 5.0) -> bytes:
        """One response with a Content-Length body, leaving the connection open."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            return head + await self.reader.readexactly(length)

    async def close(self) -> None:
        self.writer.close()
        with suppress(ConnectionResetError, BrokenPipeError):
            await self.writer.wait_closed()


async def exchange(port: int, *parts: bytes, gap: float = 0.0, timeout: float = 5.0) -> Exchange:
    """Send parts (gap seconds apart), then read until the server closes."""
    client = await Client.connect(port)
    try:
        await client.send(*parts, gap=gap)
        return await client.read_until_close(timeout)
    finally:
        await client.close()


def request(
    target: str = "/",
    headers: Sequence[tuple[str, str]] = (),
    *,
    method: str = "GET",
    body: bytes = b"",
    close: bool = True,
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: gateway.test"]
    lines += [f"{name}: {value}" for name, value in headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
