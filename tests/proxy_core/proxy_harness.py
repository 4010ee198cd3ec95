"""In-process gateway and upstreams on loopback for the proxy tests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from stockade.clock import SystemClock
from stockade.proxy.app import Gateway
from stockade.proxy.settings import HealthCheck, Listener, Pool, ProxyConfig, Route, Server


@dataclass
class Upstream:
    """A small API that records what it saw."""

    name: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2**31)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
        self.seen.append(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": dict(request.headers),
                "body_size": size,
            }
        )
        tail = request.match_info["tail"]
        if tail.startswith("status/"):
            return web.json_response({"upstream": self.name}, status=int(tail.split("/")[1]))
        if tail == "slow":
            await asyncio.sleep(5)
        if tail.startswith("bytes/"):
            count = int(tail.split("/")[1])
            response = web.StreamResponse()
            response.content_length = count
            await response.prepare(request)
            block = b"x" * 65536
            left = count
            while left:
                n = min(left, len(block))
                await response.write(block[:n])
                left -= n
            await response.write_eof()
            return response
        response = web.json_response(
            {"upstream": self.name, "path": request.raw_path, "body_size": size}
        )
        response.headers["Connection"] = "keep-alive, X-Upstream-Hop"
        response.headers["X-Upstream-Hop"] = "secret"
        return response

    async def start(self, port: int = 0) -> None:
        self.runner = web.AppRunner(self.app(), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", port or self.port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[union-attr]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


def config_for(upstreams: list[Upstream], log: Path, **route_args: Any) -> ProxyConfig:
    pool = Pool(
        name="api",
        servers=tuple(Server("127.0.0.1", u.port) for u in upstreams),
        health=HealthCheck(enabled=False),
    )
    return ProxyConfig(
        listeners=(Listener("127.0.0.1", 0),),
        routes=(Route(name="api", pool="api", **route_args),),
        pools=(pool,),
        workers=1,
        access_log=str(log),
        body_idle_timeout=1.0,
    )


@asynccontextmanager
async def gateway(config: ProxyConfig) -> AsyncIterator[tuple[str, Gateway]]:
    gw = Gateway(config, SystemClock())
    await gw.start()
    runner = web.ServerRunner(gw.server("http"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", gw
    finally:
        await runner.cleanup()
        await gw.close()


def log_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def with_route(config: ProxyConfig, **changes: Any) -> ProxyConfig:
    return replace(config, routes=(replace(config.routes[0], **changes),))
