"""Authentication through the whole gateway: who gets in, what the upstream sees."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from proxy_harness import Upstream, config_for, gateway

from stockade.proxy.api_keys import generate_key
from stockade.proxy.auth_settings import AuthConfig, Issuer, RouteAuth
from stockade.proxy.settings import ProxyConfig

ISS, AUD = "https://idp.test/", "orders"


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def token(key: rsa.RSAPrivateKey, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 300, "iat": now, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": "k1"})


def auth_config(
    tmp_path: Path, key: rsa.RSAPrivateKey, api_keys: list[dict[str, Any]]
) -> AuthConfig:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    issuer = Issuer(
        name="idp", issuer=ISS, audience=(AUD,), algorithms=("RS256",), key_files=(pem,)
    )
    return AuthConfig(issuers=(issuer,), api_keys=tuple(api_keys))


def with_auth(config: ProxyConfig, auth: AuthConfig, policy: RouteAuth) -> ProxyConfig:
    route = replace(config.routes[0], auth=policy)
    return replace(config, auth=auth, routes=(route,))


JWT_POLICY = RouteAuth(
    mode="jwt",
    required_scopes=("orders:write",),
    forward_claims=(("sub", "X-Auth-Sub"),),
    headers_set=("X-Auth-Sub", "X-Consumer-ID"),
)


def run(coro: Any) -> None:
    asyncio.run(coro)


def test_jwt_route(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            config = with_auth(
                config_for([up], tmp_path / "log"), auth_config(tmp_path, rsa_key, []), JWT_POLICY
            )
            good = token(rsa_key, scope="orders:read orders:write")
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                async with s.get(f"{url}/x") as r:  # nothing sent: no error code
                    assert r.status == 401
                    assert r.headers["WWW-Authenticate"] == 'Bearer realm="stockade"'
                async with s.get(f"{url}/x", headers={"Authorization": "Bearer nope"}) as r:
                    assert r.status == 401
                    assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]
                expired = token(rsa_key, exp=int(time.time()) - 3600, scope="orders:write")
                async with s.get(f"{url}/x", headers={"Authorization": f"Bearer {expired}"}) as r:
                    assert r.status == 401
                    assert (await r.json())["error"] == "expired"
                narrow = token(rsa_key, scope="orders:read")
                async with s.get(f"{url}/x", headers={"Authorization": f"Bearer {narrow}"}) as r:
                    assert r.status == 403
                    assert 'error="insufficient_scope"' in r.headers["WWW-Authenticate"]
                assert up.seen == []  # nothing refused reached the upstream
                async with s.get(
                    f"{url}/x",
                    headers={
                        "Authorization": f"Bearer {good}",
                        "X-Auth-Sub": "mallory",  # a client cannot speak for the gateway
                        "X-Consumer-ID": "mallory",
                    },
                ) as r:
                    assert r.status == 200
            (seen,) = up.seen
            assert seen["headers"]["X-Auth-Sub"] == "alice"
            assert seen["headers"]["X-Consumer-ID"] == "alice"
            assert seen["headers"]["Authorization"] == f"Bearer {good}"  # forwarded by default
            assert good not in (tmp_path / "log").read_text()
        finally:
            await up.stop()

    run(scenario())


def test_api_key_route_and_stripping(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    async def scenario() -> None:
        key, entry = generate_key("acme", "pro")
        raw = {
            "key_id": entry.key_id,
            "salt": entry.salt.hex(),
            "digest": entry.digest.hex(),
            "consumer": entry.consumer,
            "plan": entry.plan,
        }
        up = Upstream("a")
        await up.start()
        try:
            policy = RouteAuth(
                mode="jwt_or_api_key", forward_authorization=False, headers_set=("X-Consumer-ID",)
            )
            config = with_auth(
                config_for([up], tmp_path / "log"), auth_config(tmp_path, rsa_key, [raw]), policy
            )
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                async with s.get(f"{url}/x", headers={"X-API-Key": key + "x"}) as r:
                    assert r.status == 401
                async with s.get(f"{url}/x", headers={"X-API-Key": key}) as r:
                    assert r.status == 200
                good = token(rsa_key)
                async with s.get(f"{url}/x", headers={"Authorization": f"Bearer {good}"}) as r:
                    assert r.status == 200
            by_key, by_jwt = up.seen
            assert by_key["headers"]["X-Consumer-ID"] == "acme"
            assert "X-API-Key" not in by_key["headers"]  # forward_authorization = false
            assert by_jwt["headers"]["X-Consumer-ID"] == "alice"
            assert "Authorization" not in by_jwt["headers"]
        finally:
            await up.stop()

    run(scenario())


def test_open_route_strips_a_spoofed_consumer_header(tmp_path: Path) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            async with gateway(config_for([up], tmp_path / "log")) as (url, _):
                async with aiohttp.ClientSession() as s:
                    async with s.get(f"{url}/x", headers={"X-Consumer-ID": "admin"}) as r:
                        assert r.status == 200
            assert "X-Consumer-ID" not in up.seen[0]["headers"]
        finally:
            await up.stop()

    run(scenario())


def test_refusals_are_counted_by_reason(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            config = with_auth(
                config_for([up], tmp_path / "log"), auth_config(tmp_path, rsa_key, []), JWT_POLICY
            )
            expired = token(rsa_key, exp=int(time.time()) - 3600)
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                for headers in ({}, {"Authorization": f"Bearer {expired}"}, {}):
                    async with s.get(f"{url}/x", headers=headers) as r:
                        assert r.status == 401
                assert gw.auth.failures == {"missing": 2, "expired": 1}
        finally:
            await up.stop()

    run(scenario())


def test_a_claim_that_would_break_a_header_is_refused(
    tmp_path: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            config = with_auth(
                config_for([up], tmp_path / "log"), auth_config(tmp_path, rsa_key, []), JWT_POLICY
            )
            evil = token(rsa_key, sub="alice\r\nX-Admin: yes", scope="orders:write")
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                async with s.get(f"{url}/x", headers={"Authorization": f"Bearer {evil}"}) as r:
                    assert r.status == 401
                    assert (await r.json())["error"] == "bad_claim"
            assert up.seen == []
        finally:
            await up.stop()

    run(scenario())
