"""Forged, broken and expired tokens through the whole gateway.

Each case asserts the status, the RFC 6750 challenge and that the upstream
never saw the request.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from proxy_harness import Upstream, config_for, gateway

from stockade.proxy.auth_settings import AuthConfig, Issuer, RouteAuth

ISS, AUD = "https://idp.test/", "orders"
SECRET = b"s" * 40  # the HS256 secret of a second issuer
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUB_PEM = RSA.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)


def claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    body: dict[str, Any] = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 300, "iat": now}
    body.update(changes)
    return {k: v for k, v in body.items() if v is not None}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def good() -> str:
    return jwt.encode(claims(), RSA, algorithm="RS256")


def tampered() -> str:
    head, _, sig = good().split(".")
    return ".".join([head, b64(json.dumps(claims(sub="admin")).encode()), sig])


def stripped() -> str:
    head, body, _ = good().split(".")
    return f"{head}.{body}."


def alg_none() -> str:
    head = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{head}.{b64(json.dumps(claims()).encode())}."


def key_confusion() -> str:
    # HS256 "signed" with the RSA public key's PEM: the classic confusion attack
    import hashlib
    import hmac

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims()).encode())
    sig = hmac.new(RSA_PUB_PEM, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


def other_key() -> str:
    return jwt.encode(claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256")


CASES: list[tuple[str, Callable[[], str], str]] = [
    ("expired", lambda: jwt.encode(claims(exp=int(time.time()) - 3600), RSA, "RS256"), "expired"),
    (
        "not yet valid",
        lambda: jwt.encode(claims(nbf=int(time.time()) + 3600), RSA, "RS256"),
        "not_yet_valid",
    ),
    (
        "wrong issuer",
        lambda: jwt.encode(claims(iss="https://evil.test/"), RSA, "RS256"),
        "wrong_issuer",
    ),
    ("wrong audience", lambda: jwt.encode(claims(aud="billing"), RSA, "RS256"), "wrong_audience"),
    ("missing sub", lambda: jwt.encode(claims(sub=None), RSA, "RS256"), "missing_claim"),
    ("tampered payload", tampered, "bad_signature"),
    ("signature stripped", stripped, "bad_signature"),
    ("alg none", alg_none, "bad_algorithm"),
    ("RS256 to HS256 key confusion", key_confusion, "bad_algorithm"),  # HS256 not allowed
    ("signed by another key", other_key, "bad_algorithm"),
    ("oversized", lambda: jwt.encode(claims(pad="x" * 5000), RSA, "RS256"), "too_large"),
    ("malformed base64", lambda: "abc.!!!.def", "malformed"),
    ("malformed JSON", lambda: f"{b64(b'{nope')}.{b64(b'{}')}.{b64(b'x')}", "malformed"),
]


def auth(tmp_path: Path, algorithms: tuple[str, ...] = ("RS256",)) -> AuthConfig:
    pem = tmp_path / "idp.pem"
    pem.write_bytes(RSA_PUB_PEM)
    secret = None
    if "HS256" in algorithms:
        secret = tmp_path / "hs.secret"
        secret.write_bytes(SECRET)
    return AuthConfig(
        issuers=(
            Issuer(
                name="idp",
                issuer=ISS,
                audience=(AUD,),
                algorithms=algorithms,
                key_files=(pem,),
                hs256_secret_file=secret,
                required_claims=("exp", "sub"),
            ),
        ),
        max_token_size=4096,  # below the header limit, so the auth stage is what refuses
    )


@pytest.mark.parametrize(("name", "make", "reason"), CASES, ids=[c[0] for c in CASES])
def test_bad_token_is_refused_before_the_upstream(
    tmp_path: Path, name: str, make: Callable[[], str], reason: str
) -> None:
    refused_before_upstream(tmp_path, name, make, reason, ("RS256",))


def test_key_confusion_fails_even_where_hs256_is_allowed(tmp_path: Path) -> None:
    # the issuer also takes HS256, but only with its own secret, never a public key
    refused_before_upstream(
        tmp_path, "confusion", key_confusion, "bad_signature", ("RS256", "HS256")
    )


def refused_before_upstream(
    tmp_path: Path, name: str, make: Callable[[], str], reason: str, algorithms: tuple[str, ...]
) -> None:
    async def scenario() -> None:
        up = Upstream("a")
        await up.start()
        try:
            base = config_for([up], tmp_path / "log")
            route = replace(base.routes[0], auth=RouteAuth(mode="jwt"))
            config = replace(base, auth=auth(tmp_path, algorithms), routes=(route,))
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:
                async with s.get(f"{url}/x", headers={"Authorization": f"Bearer {make()}"}) as r:
                    body = await r.json()
                    challenge = r.headers.get("WWW-Authenticate", "")
                    status = r.status
                async with s.get(f"{url}/x", headers={"Authorization": f"Bearer {good()}"}) as r:
                    assert r.status == 200, "a good token still gets through"
            assert status == 401, (name, body)
            assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge
            assert body["error"] == reason, (name, body)
            assert len(up.seen) == 1  # only the good request
        finally:
            await up.stop()

    asyncio.run(scenario())


def test_jwks_rotation_unknown_kid_and_issuer_down(tmp_path: Path) -> None:
    key_a = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    key_b = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
        return {**data, "kid": kid, "alg": "RS256", "use": "sig"}

    published = {"keys": [jwk(key_a, "a")]}

    async def jwks(_: Any) -> Any:
        from aiohttp import web

        return web.json_response(published)

    def signed(key: rsa.RSAPrivateKey, kid: str) -> str:
        return jwt.encode(claims(), key, algorithm="RS256", headers={"kid": kid})

    async def scenario() -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/jwks.json", jwks)
        idp = web.AppRunner(app, access_log=None)
        await idp.setup()
        site = web.TCPSite(idp, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        up = Upstream("a")
        await up.start()
        try:
            base = config_for([up], tmp_path / "log")
            issuer = Issuer(
                name="idp",
                issuer=ISS,
                audience=(AUD,),
                algorithms=("RS256",),
                jwks_url=f"http://127.0.0.1:{port}/jwks.json",
                jwks_refresh_interval=0.2,
            )
            route = replace(base.routes[0], auth=RouteAuth(mode="jwt"))
            config = replace(base, auth=AuthConfig(issuers=(issuer,)), routes=(route,))
            async with gateway(config) as (url, _), aiohttp.ClientSession() as s:

                async def status(token: str) -> tuple[int, str]:
                    async with s.get(f"{url}/x", headers={"Authorization": f"Bearer {token}"}) as r:
                        return r.status, (await r.json()).get(
                            "error", ""
                        ) if r.status != 200 else ""

                assert await status(signed(key_a, "a")) == (200, "")
                assert await status(signed(key_b, "b")) == (401, "unknown_kid")
                published["keys"] = [jwk(key_a, "a"), jwk(key_b, "b")]  # rotation: B published
                await asyncio.sleep(0.3)  # past the refetch interval
                assert await status(signed(key_b, "b")) == (200, "")
                assert await status(signed(key_a, "a")) == (200, "")  # old key until it goes
                await idp.cleanup()  # the issuer goes down
                await asyncio.sleep(0.3)
                assert await status(signed(key_a, "a")) == (200, "")  # known keys keep working
                key_c = rsa.generate_private_key(public_exponent=65537, key_size=2048)
                assert await status(signed(key_c, "c")) == (401, "unknown_kid")  # fail closed
            assert len(up.seen) == 4
        finally:
            await up.stop()
            await idp.cleanup()

    asyncio.run(scenario())
