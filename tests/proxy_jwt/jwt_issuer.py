"""A local token issuer for the JWT tests: keys, a JWKS served on loopback, token minting."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from stockade.clock import FakeClock
from stockade.proxy.jwt_auth import IssuerConfig, JwtVerifier

ISS = "https://idp.example.test/"
AUD = "stockade-api"
SECRET = b"s" * 64  # long enough for HS512 (RFC 7518 3.2)
ASYMMETRIC = (
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"),
)
HMAC = ("HS256", "HS384", "HS512")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


@cache
def private_key(kind: str) -> PrivateKey:
    """One key per kind and test session (RSA generation is slow)."""
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind.startswith("p256"):
        return ec.generate_private_key(ec.SECP256R1())
    if kind.startswith("p384"):
        return ec.generate_private_key(ec.SECP384R1())
    if kind.startswith("p521"):
        return ec.generate_private_key(ec.SECP521R1())
    return ed25519.Ed25519PrivateKey.generate()


def kind_for(alg: str) -> str:
    if alg.startswith(("RS", "PS")):
        return "rsa"
    return {"ES256": "p256", "ES384": "p384", "ES512": "p521", "EdDSA": "ed25519"}[alg]


def public_jwk(kind: str, kid: str, **extra: Any) -> dict[str, Any]:
    public = private_key(kind).public_key()
    jwk: dict[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, "use": "sig", **extra}


def public_pem(kind: str) -> bytes:
    return (
        private_key(kind)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def claims(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    now = int(clock.wall())
    base: dict[str, Any] = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice",
        "iat": now,
        "nbf": now,
        "exp": now + 300,
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def mint(
    clock: FakeClock,
    alg: str = "RS256",
    kid: str | None = "k1",
    kind: str | None = None,
    **overrides: Any,
) -> str:
    key: Any = SECRET if alg in HMAC else private_key(kind or kind_for(alg))
    headers = {"kid": kid} if kid is not None else None
    return jwt.encode(claims(clock, **overrides), key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(header: dict[str, Any], payload: dict[str, Any], hmac_key: bytes | None) -> str:
    """A token built by hand (PyJWT refuses to sign HS256 with a PEM, as an attacker would)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b""
    if hmac_key is not None:
        signature = hmac.new(hmac_key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@dataclass
class JwksServer:
    """A JWKS endpoint on 127.0.0.1 that counts fetches and can be made to fail."""

    keys: list[Any] = field(default_factory=list)  # JWKs, or junk for the tests
    headers: dict[str, str] = field(default_factory=dict)  # sent with the JWKS (Cache-Control)
    fetches: int = 0
    down: bool = False
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/.well-known/jwks.json"

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({"keys": self.keys}, headers=self.headers)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


def default_jwks() -> list[dict[str, Any]]:
    return [
        public_jwk("rsa", "k1"),
        public_jwk("p256", "k1"),
        public_jwk("p384", "k1"),
        public_jwk("p521", "k1"),
        public_jwk("ed25519", "k1"),
    ]


def inhouse(url: str, **overrides: Any) -> IssuerConfig:
    fields: dict[str, Any] = {
        "name": "inhouse",
        "issuer": ISS,
        "audience": (AUD, "other-api"),
        "algorithms": (*ASYMMETRIC, *HMAC),
        "jwks_url": url,
        "hs256_secret": SECRET,
        "jwks_refresh_interval": 300.0,
    }
    fields.update(overrides)
    return IssuerConfig(**fields)


@asynccontextmanager
async def issuer_env(
    *configs: IssuerConfig | None,
    keys: list[Any] | None = None,
    down: bool = False,
    **verifier_args: Any,
) -> AsyncIterator[tuple[JwtVerifier, JwksServer, FakeClock]]:
    """A JWKS server and a started verifier; with no configs, the inhouse issuer on it.
    The verifier's periodic refresh runs only when the test calls refresh_due() (the fake
    clock does not move by itself), unless background_refresh=True is passed."""
    verifier_args.setdefault("background_refresh", False)
    server = JwksServer(keys=default_jwks() if keys is None else keys, down=down)
    await server.start()
    clock = FakeClock()
    chosen = [c for c in configs if c is not None] or [inhouse(server.url)]
    chosen = [c if c.jwks_url != "JWKS" else _with_url(c, server.url) for c in chosen]
    verifier = JwtVerifier(chosen, clock, **verifier_args)
    try:
        await verifier.start()
        yield verifier, server, clock
    finally:
        await verifier.close()
        await server.stop()


def _with_url(config: IssuerConfig, url: str) -> IssuerConfig:
    from dataclasses import replace

    return replace(config, jwks_url=url)
