"""A gateway with a protected and an open route, upstreams that record the raw
request, and a raw-socket client, for the request-boundary tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from aiohttp.web_request import BaseRequest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from stockade.clock import SystemClock
from stockade.proxy.api_keys import generate_key
from stockade.proxy.app import Gateway
from stockade.proxy.auth_settings import AuthConfig, Issuer, RouteAuth
from stockade.proxy.context import RequestContext
from stockade.proxy.settings import HealthCheck, Listener, Pool, ProxyConfig, Route, Server

ISS, AUD = "https://idp.test/", "orders"
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
API_KEY, API_KEY_ENTRY = generate_key("acme", "pro")


def token(**claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 300, "iat": now, **claims}
    return jwt.encode(body, RSA, algorithm="RS256")


def auth_config(tmp_path: Path) -> AuthConfig:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        RSA.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    entry = API_KEY_ENTRY
    key = {
        "key_id": entry.key_id,
        "salt": entry.salt.hex(),
        "digest": entry.digest.hex(),
        "consumer": entry.consumer,
        "plan": entry.plan,
    }
    issuer = Issuer(
        name="idp", issuer=ISS, audience=(AUD,), algorithms=("RS256",), key_files=(pem,)
    )
    return AuthConfig(issuers=(issuer,), api_keys=(key,))


# The protected route: a JWT or an API key; the sub claim goes upstream as X-Auth-Sub.
ADMIN_AUTH = RouteAuth(
    mode="jwt_or_api_key",
    forward_claims=(("sub", "X-Auth-Sub"),),
    headers_set=("X-Auth-Sub", "X-Consumer-ID"),
)


@dataclass
class RecordingUpstream:
    """Records each request's target and header lines exactly as they arrived."""

    name: str
    seen: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    runner: web.ServerRunner | None = None

    async def handle(self, request: BaseRequest) -> web.StreamResponse:
        await request.read()
        self.seen.append(
            {
                "target": request.raw_path,
                "lines": [(k.decode(), v.decode()) for k, v in request.raw_headers],
                "version": tuple(request.version),
            }
        )
        return web.Response(text=self.name)

    def values(self, index: int, name: str) -> list[str]:
        """Every value of header `name` the upstream got in request `index`."""
        return [v for k, v in self.seen[index]["lines"] if k.lower() == name.lower()]

    async def start(self) -> None:
        self.runner = web.ServerRunner(web.Server(self.handle), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def two_route_config(
    tmp_path: Path,
    upstream: RecordingUpstream,
    admin: dict[str, Any] | None = None,
    open_route: dict[str, Any] | None = None,
    **changes: Any,
) -> ProxyConfig:
    """Route "admin" (/admin, authenticated) and route "open" (/, no auth), one upstream."""
    pool = Pool(
        name="api",
        servers=(Server("127.0.0.1", upstream.port),),
        health=HealthCheck(enabled=False),
    )
    routes = (
        Route(name="admin", pool="api", path_prefix="/admin", auth=ADMIN_AUTH, **(admin or {})),
        Route(name="open", pool="api", path_prefix="/", **(open_route or {})),
    )
    settings: dict[str, Any] = {
        "listeners": (Listener("127.0.0.1", 0),),
        "routes": routes,
        "pools": (pool,),
        "workers": 1,
        "access_log": str(tmp_path / "access.log"),
        "auth": auth_config(tmp_path),
        "body_idle_timeout": 1.0,
    }
    settings.update(changes)
    return ProxyConfig(**settings)


@dataclass
class Running:
    port: int
    gateway: Gateway
    decided: list[RequestContext]  # every finished request's context, in order


@asynccontextmanager
async def running_gateway(config: ProxyConfig) -> AsyncIterator[Running]:
    gw = Gateway(config, SystemClock())
    await gw.start()
    decided: list[RequestContext] = []
    observe: Callable[[RequestContext, str], None] = gw.observe

    def recording_observe(ctx: RequestContext, method: str) -> None:
        decided.append(ctx)
        observe(ctx, method)

    gw.observe = recording_observe  # type: ignore[method-assign]
    runner = web.ServerRunner(gw.server("http"))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Running(port, gw, decided)
    finally:
        await runner.cleanup()
        await gw.close()


async def exchange(port: int, head: bytes) -> tuple[int, bytes]:
    """Send one raw request (Connection: close is added); the status and the whole reply."""
    if b"\r\nConnection:" not in head:
        head = head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(reply.split(b" ", 2)[1]), reply


def request(target: str, *headers: tuple[str, str], host: str | None = "t") -> bytes:
    """A raw GET head; `host=None` leaves Host out."""
    lines = [f"GET {target} HTTP/1.1"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
