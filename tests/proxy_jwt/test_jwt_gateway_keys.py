"""Through the running gateway: a route with auth = "jwt" whose issuer's keys come from a JWKS
(or a discovery document and a JWKS) sent in small pieces, over TLS with a test CA."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web
from jwt_issuer import AUD
from jwt_issuer import mint as mint_at
from piecewise_http import DISCOVERY, LARGE, SMALL, PiecewiseServer, Reply, ca_file, server_tls

from stockade.clock import FakeClock, SystemClock
from stockade.proxy.app import Gateway
from stockade.proxy.auth_settings import AuthConfig, Issuer, RouteAuth
from stockade.proxy.settings import HealthCheck, Listener, Pool, ProxyConfig, Route, Server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def upstream() -> tuple[web.AppRunner, int]:
    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"sub": request.headers.get("X-Consumer-ID")})

    app = web.Application()
    app.router.add_get("/{tail:.*}", ok)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@asynccontextmanager
async def gateway(issuer: Issuer, tmp_path: Path) -> AsyncIterator[tuple[str, Gateway]]:
    runner, port = await upstream()
    pool = Pool(name="api", servers=(Server("127.0.0.1", port),), health=HealthCheck(enabled=False))
    config = ProxyConfig(
        listeners=(Listener("127.0.0.1", 0),),
        routes=(Route(name="api", pool="api", auth=RouteAuth(mode="jwt")),),
        pools=(pool,),
        workers=1,
        access_log=str(tmp_path / "access.log"),
        auth=AuthConfig(issuers=(issuer,)),
    )
    gw = Gateway(config, SystemClock())
    await gw.start()
    server = web.ServerRunner(gw.server("http"))
    await server.setup()
    site = web.TCPSite(server, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{server.addresses[0][1]}", gw
    finally:
        await server.cleanup()
        await gw.close()
        await runner.cleanup()


def mint(jwks: dict[str, Any], iss: str) -> str:
    clock = FakeClock(wall=time.time())
    if jwks is SMALL:
        return mint_at(clock, "EdDSA", kid="pieces", kind="ed25519-pieces", iss=iss)
    return mint_at(clock, "RS256", kid="pieces", kind="rsa-pieces", iss=iss)


async def get(url: str, token: str) -> tuple[int, dict[str, Any]]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{url}/orders", headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        return response.status, await response.json()


@pytest.mark.parametrize(
    ("name", "discovery", "tls", "piece", "jwks"),
    [
        ("jwks_url, plain http, chunked, 1-byte writes", False, False, 1, SMALL),
        ("OpenID discovery, TLS, chunked, 7-byte writes", True, True, 7, LARGE),
    ],
)
def test_token_whose_key_is_only_in_a_jwks_sent_in_pieces_gets_through(
    ca: trustme.CA,
    tmp_path: Path,
    name: str,
    discovery: bool,
    tls: bool,
    piece: int,
    jwks: dict[str, Any],
) -> None:
    async def scenario() -> None:
        idp = PiecewiseServer(piece=piece, tls=server_tls(ca) if tls else None)
        await idp.start()
        iss = idp.base + "/"
        idp.routes = {
            DISCOVERY: Reply.json({"issuer": iss, "jwks_uri": idp.url("/keys")}),
            "/keys": Reply.json(jwks),
        }
        issuer = Issuer(
            name="idp",
            issuer=iss,
            audience=(AUD,),
            algorithms=("RS256", "EdDSA"),
            jwks_url=None if discovery else idp.url("/keys"),
            jwks_timeout=20.0,
            ca_file=ca_file(ca, tmp_path) if tls else None,
        )
        try:
            async with gateway(issuer, tmp_path) as (url, _):
                status, body = await get(url, mint(jwks, iss))
                assert status == 200, (name, body)
                assert body == {"sub": "alice"}
                # a key the JWKS does not have: refused, the issuer is reachable
                other = mint_at(FakeClock(wall=time.time()), "RS256", kid="nope", iss=iss)
                status, body = await get(url, other)
                assert (status, body["error"]) == (401, "unknown_kid")
            assert idp.hits["/keys"] == 1 and idp.hits[DISCOVERY] == int(discovery)
        finally:
            await idp.stop()

    asyncio.run(scenario())


def test_jwks_fetch_failures_are_a_metric(tmp_path: Path) -> None:
    async def scenario() -> None:
        idp = PiecewiseServer({"/keys": Reply(503, b"down")})
        await idp.start()
        issuer = Issuer(
            name="down-idp",
            issuer=idp.base + "/",
            audience=(AUD,),
            algorithms=("RS256",),
            jwks_url=idp.url("/keys"),
        )
        try:
            async with gateway(issuer, tmp_path) as (url, gw):
                token = mint_at(FakeClock(wall=time.time()), iss=idp.base + "/")
                status, body = await get(url, token)
                assert (status, body["error"]) == (401, "jwks_unavailable")
                gw.sync_metrics()
                counter = gw.metrics.jwks_fetch_failures.labels("down-idp")
                assert counter._value.get() == 1
        finally:
            await idp.stop()

    asyncio.run(scenario())
