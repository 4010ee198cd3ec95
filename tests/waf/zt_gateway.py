"""Zero trust through the running gateway: routes with auth, tokens, API keys, an upstream
that records what it got."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from waf_harness import HOST, RecordingUpstream, ThreadedGateway, waf_config

from stockade.proxy.api_keys import ApiKeyEntry, generate_key
from stockade.proxy.auth_settings import AuthConfig, Issuer, RouteAuth
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.waf_settings import RouteWaf

OPENAPI = Path(__file__).parent / "openapi"
PETSTORE = OPENAPI / "petstore3.yaml"
ISS, AUD = "https://idp.test/", "petstore"
API_KEY_HEADER = "api_key"  # the Petstore's apiKey scheme: stockade must read that header


@dataclass
class Seen:
    method: str
    target: str  # path and query, as the upstream got them
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class TargetUpstream(RecordingUpstream):
    """Records each request's method, target and headers as well as its body."""

    seen: list[Seen] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.bodies.append(body)
        self.seen.append(
            Seen(request.method, request.raw_path, list(request.headers.items()), body)
        )
        return web.json_response({"ok": True, "size": len(body)})


class ZeroTrustGateway(ThreadedGateway):
    upstream: TargetUpstream

    def __init__(self, make_config: Any) -> None:
        super().__init__(make_config)
        self.upstream = TargetUpstream()


@dataclass(frozen=True)
class ZtRoute:
    name: str
    document: Path
    auth: str = "none"
    prefix: str | None = None  # default /NAME/
    base_path: str | None = None
    action: str = "block"


@dataclass
class Credentials:
    key: rsa.RSAPrivateKey
    api_key: str
    entry: ApiKeyEntry

    def token(self, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": now + 600, "iat": now, **claims}
        return jwt.encode(body, self.key, algorithm="RS256", headers={"kid": "k1"})


def credentials() -> Credentials:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    api_key, entry = generate_key("shop", "free")
    return Credentials(key, api_key, entry)


def auth_config(tmp: Path, creds: Credentials) -> AuthConfig:
    pem = tmp / "idp.pem"
    pem.write_bytes(
        creds.key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    issuer = Issuer(
        name="idp", issuer=ISS, audience=(AUD,), algorithms=("RS256",), key_files=(pem,)
    )
    entry = creds.entry
    raw = {
        "key_id": entry.key_id,
        "salt": entry.salt.hex(),
        "digest": entry.digest.hex(),
        "consumer": entry.consumer,
        "plan": entry.plan,
    }
    return AuthConfig(issuers=(issuer,), api_keys=(raw,), api_key_header=API_KEY_HEADER)


def zt_config(
    upstream: RecordingUpstream, tmp: Path, auth: AuthConfig, routes: list[ZtRoute]
) -> ProxyConfig:
    policies = {
        r.name: RouteWaf("zero_trust", r.action, openapi=r.document, openapi_base_path=r.base_path)
        for r in routes
    }
    config = waf_config(upstream, tmp / "access.log", policies)
    by_name = {r.name: r for r in routes}
    built = tuple(
        replace(
            route,
            path_prefix=by_name[route.name].prefix or route.path_prefix,
            auth=RouteAuth(mode=by_name[route.name].auth),
        )
        for route in config.routes
    )
    return replace(config, auth=auth, routes=built)


def request(method: str, target: str, body: bytes = b"", headers: tuple[str, ...] = ()) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {HOST}", *headers]
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def bearer(token: str) -> str:
    return f"Authorization: Bearer {token}"
