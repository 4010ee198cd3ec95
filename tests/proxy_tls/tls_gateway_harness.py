"""The gateway's HTTPS listener as a worker serves it, for tests with blocking clients.

`TlsGateway` runs, on its own event loop in a thread, what proxy/workers.py runs: a
Gateway with its pipeline, `gateway.server("https", counters)` and `listener_site()` on a
socket from `bind()`, in front of a small upstream. The loop is asyncio's or uvloop's (a
worker uses uvloop when it is installed). Also: raw TLS clients that misbehave (a
ClientHello in slow pieces, a handshake that stops half-way).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from stockade.clock import SystemClock
from stockade.proxy.app import Gateway
from stockade.proxy.limits import LimitCounters
from stockade.proxy.settings import (
    Certificate,
    HealthCheck,
    Listener,
    Pool,
    ProxyConfig,
    Route,
    Server,
)
from stockade.proxy.tls import ServerTls
from stockade.proxy.workers import bind, listener_site

LOOPBACK = "127.0.0.1"
SERVER_NAME = "api.example.test"
T = TypeVar("T")
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def gateway_config(certificate: Certificate, log: Path, **limits: Any) -> ProxyConfig:
    """One HTTPS listener on a free port, one route to the upstream (its port set later)."""
    return ProxyConfig(
        listeners=(Listener(LOOPBACK, 0, (certificate,)),),
        routes=(Route(name="api", pool="api"),),
        pools=(Pool("api", (Server(LOOPBACK, 1),), health=HealthCheck(enabled=False)),),
        workers=1,
        access_log=str(log),
        **limits,
    )


class TlsGateway:
    """`with TlsGateway(config, loop_factory) as gw:` serves HTTPS on 127.0.0.1:gw.port."""

    def __init__(self, config: ProxyConfig, loop_factory: LoopFactory) -> None:
        self._config = config
        self._loop = loop_factory()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-gateway")
        self._runners: list[web.BaseRunner] = []
        self._gateway: Gateway | None = None
        self.counters = LimitCounters()  # read them with snapshot(): they live on the loop
        self.port = 0

    def __enter__(self) -> TlsGateway:
        self._thread.start()
        try:
            self._await(self._start)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._await(self._cleanup)
        finally:
            self._stop()

    async def _start(self) -> None:
        upstream = web.Application()
        upstream.router.add_get("/", _hello)
        up_runner = web.AppRunner(upstream, access_log=None)
        await up_runner.setup()
        self._runners.append(up_runner)
        up_site = web.TCPSite(up_runner, LOOPBACK, 0)
        await up_site.start()
        up_port = up_runner.addresses[0][1]
        pool = replace(self._config.pools[0], servers=(Server(LOOPBACK, up_port),))
        config = replace(self._config, pools=(pool,))
        self._gateway = Gateway(config, SystemClock())
        await self._gateway.start()
        runner = web.ServerRunner(self._gateway.server("https", self.counters))
        await runner.setup()
        self._runners.append(runner)
        listener = config.listeners[0]
        sock = bind(listener)
        site = listener_site(runner, sock, ServerTls(listener.certificates).context)
        await site.start()
        self.port = sock.getsockname()[1]

    async def _cleanup(self) -> None:
        for runner in reversed(self._runners):
            await runner.cleanup()
        if self._gateway is not None:
            await self._gateway.close()

    def _await(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(factory(), self._loop).result(timeout=20)

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def snapshot(self) -> LimitCounters:
        """A copy of the counters, taken on the loop."""

        async def copy() -> LimitCounters:
            return replace(self.counters)

        return self._await(copy)

    def wait_for(self, check: Callable[[LimitCounters], bool], timeout: float = 5) -> LimitCounters:
        """Poll the counters until check() holds; the last snapshot either way."""
        deadline = time.monotonic() + timeout
        while True:
            counters = self.snapshot()
            if check(counters) or time.monotonic() > deadline:
                return counters
            time.sleep(0.02)


async def _hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


def closed_after(sock: socket.socket, started: float, timeout: float = 10) -> float:
    """Seconds from `started` until the server closed sock (EOF or reset)."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    return time.monotonic() - started


class RawTlsClient:
    """A TLS client over a plain socket, so a test controls every write of the handshake."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=10)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname=SERVER_NAME)

    def client_hello(self) -> bytes:
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self._out.read()

    def finish_handshake(self) -> None:
        """Go on from a ClientHello already sent, until the handshake is done."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                if not data:
                    raise EOFError("the server closed the connection in the handshake") from None
                self._in.write(data)
        self._flush()

    def send(self, data: bytes) -> None:
        self.tls.write(data)
        self._flush()

    def response(self) -> bytes:
        """Everything the server sends until it closes (the request asks it to)."""
        data = b""
        while True:
            try:
                chunk = self.tls.read(65536)
            except ssl.SSLWantReadError:
                raw = self.sock.recv(65536)
                if not raw:
                    return data
                self._in.write(raw)
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return data
            if not chunk:
                return data
            data += chunk

    def _flush(self) -> None:
        out = self._out.read()
        if out:
            self.sock.sendall(out)

    def close(self) -> None:
        self.sock.close()


def https_get(port: int, context: ssl.SSLContext) -> int:
    """One GET / over a fresh TLS connection: the status."""
    with (
        socket.create_connection((LOOPBACK, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
    ):
        tls.sendall(f"GET / HTTP/1.1\r\nHost: {SERVER_NAME}\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := tls.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])
