"""An in-process gateway with WAF routes, and an upstream that records bodies."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from stockade.clock import SystemClock
from stockade.proxy.app import Gateway
from stockade.proxy.settings import HealthCheck, Listener, Pool, ProxyConfig, Route, Server
from stockade.proxy.waf_settings import RouteWaf, WafConfig

HOST = "api.example.com"  # CRS scores a numeric Host header; real clients send a name


@dataclass
class RecordingUpstream:
    """Answers 200 with what it got; keeps the bodies it saw."""

    bodies: list[bytes] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        return web.json_response({"ok": True, "size": len(body)})

    async def start(self) -> None:
        app = web.Application(client_max_size=2**30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        # bodies as they came on the wire: the test compares them byte for byte
        self.runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def waf_config(
    upstream: RecordingUpstream,
    log: Path,
    routes: dict[str, RouteWaf],
    waf: WafConfig | None = None,
    **proxy: Any,
) -> ProxyConfig:
    """One route per entry, at /NAME/, each with its WAF policy."""
    pool = Pool("api", (Server("127.0.0.1", upstream.port),), health=HealthCheck(enabled=False))
    return ProxyConfig(
        listeners=(Listener("127.0.0.1", 0),),
        routes=tuple(
            Route(name=name, pool="api", path_prefix=f"/{name}/", waf=policy)
            for name, policy in routes.items()
        ),
        pools=(pool,),
        workers=1,
        access_log=str(log),
        body_idle_timeout=2.0,
        waf=waf or WafConfig(),
        **proxy,
    )


@asynccontextmanager
async def serving(config: ProxyConfig) -> AsyncIterator[tuple[str, Gateway]]:
    gateway = Gateway(config, SystemClock())
    await gateway.start()
    runner = web.ServerRunner(gateway.server("http"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", gateway
    finally:
        await runner.cleanup()
        await gateway.close()


def with_policy(config: ProxyConfig, name: str, **changes: Any) -> ProxyConfig:
    routes = tuple(
        replace(r, waf=replace(r.waf, **changes)) if r.name == name else r for r in config.routes
    )
    return replace(config, routes=routes)


class ThreadedGateway:
    """A gateway and its upstream on an event loop in a thread, for plain-socket tests."""

    def __init__(self, make_config: Callable[[RecordingUpstream], ProxyConfig]) -> None:
        self.make_config = make_config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.upstream = RecordingUpstream()
        self.port = 0
        self.gateway: Gateway | None = None
        self._stack: AsyncExitStack | None = None

    def __enter__(self) -> ThreadedGateway:
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        await self.upstream.start()
        self._stack = AsyncExitStack()
        base, self.gateway = await self._stack.enter_async_context(
            serving(self.make_config(self.upstream))
        )
        self.port = int(base.rsplit(":", 1)[1])

    async def _stop(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        await self.upstream.stop()

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def send(self, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
        """One request on its own connection (it asks for Connection: close)."""
        return send_raw(self.port, data, timeout)


def send_raw(port: int, data: bytes, timeout: float = 10.0) -> tuple[int, bytes]:
    """Send raw bytes; the status and body of the answer (read to EOF)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    answer = b"".join(chunks)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body
