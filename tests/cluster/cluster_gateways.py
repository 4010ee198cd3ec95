"""In-process gateways sharing one Redis, and a small upstream, on loopback."""

from __future__ import annotations

import tomllib
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

from aiohttp import web
from cluster_nodes import cluster_key

from stockade.clock import SystemClock
from stockade.config import parse_config
from stockade.proxy.app import Gateway
from stockade.proxy.settings import ProxyConfig


async def _answer(request: web.Request) -> web.Response:
    """200, or the status named by /status/NNN/..."""
    parts = request.path.split("/")
    status = int(parts[2]) if len(parts) > 2 and parts[1] == "status" else 200
    return web.json_response({"path": request.path}, status=status)


@asynccontextmanager
async def upstream() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    finally:
        await runner.cleanup()


def proxy_config(
    home: Path,
    upstream_port: int,
    redis_url: str,
    extra: str,
    route: str = "",
    cluster: str = "",
    quotas: str = "",
) -> ProxyConfig:
    """A gateway config with [cluster] on `redis_url` and `extra` TOML for [proxy.*]."""
    home.mkdir(parents=True, exist_ok=True)
    key = cluster_key(home.parent)  # the proxy does not read it; the config names it
    text = f"""
[cluster]
backend = "redis"
url = "{redis_url}"
node = "{home.name}"
timeout = "300ms"
retry_interval = "500ms"
expected_nodes = 3
{cluster}
[cluster.auth]
key_file = "{key}"
[proxy]
access_log = "{home / "access.log"}"
status_dir = "{home / "status"}"
[proxy.quotas]
database = "{home / "usage.db"}"
{quotas}
[proxy.pools.api]
servers = ["127.0.0.1:{upstream_port}"]
[proxy.pools.api.health]
enabled = false
{extra}
[[proxy.listeners]]
address = "127.0.0.1"
port = 8080  # not bound: gateways() serves each on a port of its own
[[proxy.routes]]
pool = "api"
{route}
"""
    return parse_config(tomllib.loads(text)).proxy


@asynccontextmanager
async def gateways(configs: list[ProxyConfig]) -> AsyncIterator[list[tuple[str, Gateway]]]:
    """One in-process gateway per config (each with its own shared-memory tables)."""
    async with AsyncExitStack() as stack:
        out = []
        for config in configs:
            gw = Gateway(config, SystemClock())
            await gw.start()
            stack.push_async_callback(gw.close)
            runner = web.ServerRunner(gw.server("http"))
            await runner.setup()
            stack.push_async_callback(runner.cleanup)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            out.append((f"http://127.0.0.1:{port}", gw))
        yield out
