"""The gateways of the L7 benches, built from one set of pieces.

stockade's TOML and HAProxy's config in front of the one upstream, the RS256
material, and the checks that a gateway does the work asked of it before
anything is measured. bench.l7 (case 3), bench.jwt (case 4), bench.limits
(case 5) and bench.cluster build their gateways here, so "JWT" or "three rate
limits" is the same work in every case that names it:

  JWT            stockade: an issuer (RS256, iss, aud, exp required) and
                 `auth = "jwt"` on the route; HAProxy: `http-request` rules
                 checking alg, iss, aud and exp, then `jwt_verify` RS256
                 against the same public key, on every request
  three limits   stockade: limits keyed by ip, header:X-Tenant and query:key;
                 HAProxy: three stick tables tracking src, req.hdr(X-Tenant)
                 and url_param(key), each with an http_req_rate deny rule

No gateway has a WAF but stockade (HAProxy 2.6 has none).
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt as pyjwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from bench.common import BenchError

HOST = "127.0.0.1"
ISSUER = "https://bench.test/"
AUDIENCE = "bench"
TOKEN_LIFETIME_S = 3600
TENANT_HEADER = "X-Tenant"
QUERY_KEY = "key"
JWT_ACL = "jwt_path"
LIMITED_ACL = "limited_path"


@dataclass(frozen=True)
class Limit:
    """One rate limit, as stockade and HAProxy each key it."""

    name: str  # stockade's [proxy.rate_limiting.limits.NAME]
    key: str  # stockade's key
    fetch: str  # HAProxy's sample fetch for the same key
    table: str  # HAProxy's stick table for it
    table_type: str  # and its key type


PER_IP = Limit("per_ip", "ip", "src", "st_src", "ip")
THREE_LIMITS = (
    PER_IP,
    Limit(
        "per_tenant",
        f"header:{TENANT_HEADER}",
        f"req.hdr({TENANT_HEADER})",
        "st_tenant",
        "string len 64",
    ),
    Limit("per_key", f"query:{QUERY_KEY}", f"url_param({QUERY_KEY})", "st_key", "string len 64"),
)


@dataclass(frozen=True)
class Issuer:
    """The one JWT issuer both gateways accept: RS256 with this public key."""

    key_file: Path
    issuer: str = ISSUER
    audience: str = AUDIENCE


@dataclass(frozen=True)
class Route:
    """One of stockade's routes to the upstream pool."""

    name: str | None = None
    path_prefix: str | None = None  # None: every path (the longest prefix wins)
    auth: str | None = None  # "none" | "jwt"; None: the default (none)
    rate_limits: tuple[str, ...] = ()
    waf: str | None = None  # "sqli_xss", ...; None: off
    openapi: Path | None = None  # the zero_trust mode's document


# --- stockade -----------------------------------------------------------------------

STOCKADE_BASE = """\
[proxy]
workers = {workers}
status_dir = "{state}/status"
metrics_dir = "{state}/metrics"
access_log = "/dev/null"
drain_timeout = "5s"

# metrics are counted as in production; served on a free port
[proxy.admin]
port = 0

[[proxy.listeners]]
address = "{host}"
port = {port}

[proxy.pools.upstream]
servers = ["{host}:{upstream_port}"]

[proxy.pools.upstream.health]
enabled = false
"""


def _toml_route(route: Route) -> str:
    lines = ["[[proxy.routes]]"]
    if route.name is not None:
        lines.append(f'name = "{route.name}"')
    lines.append('pool = "upstream"')
    if route.path_prefix is not None:
        lines.append(f'path_prefix = "{route.path_prefix}"')
    if route.auth is not None:
        lines.append(f'auth = "{route.auth}"')
    if route.rate_limits:
        lines.append("rate_limits = [" + ", ".join(f'"{n}"' for n in route.rate_limits) + "]")
    if route.waf is not None:
        lines.append(f'waf = "{route.waf}"')
    if route.openapi is not None:
        lines.append(f'openapi = "{route.openapi}"')
    return "\n".join(lines) + "\n"


def stockade_toml(
    *,
    workers: int,
    port: int,
    upstream_port: int,
    state: Path,
    routes: Sequence[Route] = (Route(),),
    limits: Sequence[Limit] = (),
    limit_per_min: int = 0,
    all_routes: bool = False,
    issuer: Issuer | None = None,
    host: str = HOST,
) -> str:
    """`stockade proxy run`'s config: the base (no access log, health checks off), the
    limits (each limit_per_min a minute; on every route when all_routes, else on the
    routes naming them), the issuer and the routes."""
    parts = [
        STOCKADE_BASE.format(
            workers=workers, host=host, port=port, upstream_port=upstream_port, state=state
        )
    ]
    for limit in limits:
        lines = [
            f"[proxy.rate_limiting.limits.{limit.name}]",
            f'rate = "{limit_per_min}/min"',
            f'key = "{limit.key}"',
        ]
        if all_routes:
            lines.append("all_routes = true")
        parts.append("\n".join(lines) + "\n")
    if issuer is not None:
        parts.append(
            "[proxy.auth.issuers.bench]\n"
            f'issuer = "{issuer.issuer}"\n'
            f'audience = ["{issuer.audience}"]\n'
            'algorithms = ["RS256"]\n'
            f'key_files = ["{issuer.key_file}"]\n'
        )
    parts += [_toml_route(route) for route in routes]
    return "\n".join(parts)


# --- HAProxy ------------------------------------------------------------------------

# A plain proxy: no logging, keep-alive on both sides, idle server connections
# shared between clients. {frontend} adds rules, {tables} backend sections.
HAPROXY_CFG = """\
global
    nbthread {threads}
    maxconn 4096
{stats}defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend proxy
    bind {host}:{port}
{frontend}    default_backend upstream
backend upstream
    http-reuse always
    server upstream {host}:{upstream_port}
{tables}"""


def haproxy_cfg(
    *,
    threads: int,
    port: int,
    upstream_port: int,
    frontend: str = "",
    tables: str = "",
    stats_socket: Path | None = None,
    host: str = HOST,
) -> str:
    stats = f"    stats socket {stats_socket} mode 600 level admin\n" if stats_socket else ""
    return HAPROXY_CFG.format(
        threads=threads,
        stats=stats,
        host=host,
        port=port,
        upstream_port=upstream_port,
        frontend=frontend,
        tables=tables,
    )


def _acl(name: str, prefixes: Sequence[str]) -> str:
    return f"    acl {name} path_beg {' '.join(prefixes)}\n" if prefixes else ""


def haproxy_limits(
    limits: Sequence[Limit], per_min: int, prefixes: Sequence[str] = ()
) -> tuple[str, str]:
    """Frontend rules and backend sections for the limits: each key tracked in its own
    stick table (sticky counters sc0, sc1, ...; HAProxy keeps one table per section,
    so each lives in an otherwise empty backend) and denied above per_min a minute,
    on the paths under prefixes (every path without)."""
    when = f" if {LIMITED_ACL}" if prefixes else ""
    also = f"{LIMITED_ACL} " if prefixes else ""
    rules = _acl(LIMITED_ACL, prefixes)
    for n, limit in enumerate(limits):
        rules += f"    http-request track-sc{n} {limit.fetch} table {limit.table}{when}\n"
    for n, _ in enumerate(limits):
        rules += (
            f"    http-request deny deny_status 429 if {also}"
            f"{{ sc_http_req_rate({n}) gt {per_min} }}\n"
        )
    tables = "".join(
        f"backend {limit.table}\n"
        f"    stick-table type {limit.table_type} size 100k expire 60s "
        "store http_req_rate(60s)\n"
        for limit in limits
    )
    return rules, tables


def haproxy_jwt(issuer: Issuer, prefixes: Sequence[str]) -> str:
    """Frontend rules checking what stockade checks on a JWT route, on the paths under
    prefixes: alg is RS256, iss, aud, exp (date() is whole seconds), then the RS256
    signature with jwt_verify; HAProxy has no cache: every request pays the check."""
    acl = JWT_ACL
    return (
        _acl(acl, prefixes)
        + f"    http-request set-var(txn.bearer) http_auth_bearer if {acl}\n"
        + f"    http-request set-var(txn.alg) var(txn.bearer),jwt_header_query('$.alg') if {acl}\n"
        + f"    http-request set-var(txn.now) date() if {acl}\n"
        + f"    http-request deny deny_status 401 if {acl} !{{ var(txn.alg) -m str RS256 }}\n"
        + f"    http-request deny deny_status 401 if {acl} "
        f"!{{ var(txn.bearer),jwt_payload_query('$.iss') -m str {issuer.issuer} }}\n"
        + f"    http-request deny deny_status 401 if {acl} "
        f"!{{ var(txn.bearer),jwt_payload_query('$.aud') -m str {issuer.audience} }}\n"
        + f"    http-request deny deny_status 401 if {acl} "
        "!{ var(txn.bearer),jwt_payload_query('$.exp','int'),sub(txn.now) -m int gt 0 }\n"
        + f"    http-request deny deny_status 401 if {acl} "
        f'!{{ var(txn.bearer),jwt_verify(txn.alg,"{issuer.key_file}") -m int 1 }}\n'
    )


# --- RS256 material -----------------------------------------------------------------


def private_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_keys(tmp: Path) -> tuple[bytes, Path]:
    """A fresh RSA-2048 key pair: the private key's PEM, and the public key's file."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = tmp / "pub.pem"
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_pem(key), public


def other_key() -> bytes:
    """A private key the gateways do not know, for a forged token."""
    return private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def sign(private: bytes, first: int, count: int, exp: int) -> list[str]:
    """`count` RS256 tokens with iss, aud, exp and sub = u<first>, u<first + 1>, ..."""
    key = serialization.load_pem_private_key(private, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "exp": exp}
    return [
        pyjwt.encode({**claims, "sub": f"u{n}"}, key, algorithm="RS256")
        for n in range(first, first + count)
    ]


def token_expiry() -> int:
    return int(time.time()) + TOKEN_LIFETIME_S


# --- checks before measuring --------------------------------------------------------


def request(
    port: int, path: str, headers: dict[str, str] | None = None, host: str = HOST
) -> tuple[int, dict[str, str]]:
    """One GET; its status and response headers (names in lower case)."""
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}
    finally:
        conn.close()


def check_jwt(
    name: str, port: int, path: str, good: str, forged: str, headers: dict[str, str] | None = None
) -> None:
    """path refuses no token and a token signed by another key, takes a good one."""
    for label, token, ok in (
        ("no token", None, False),
        ("a token signed by another key", forged, False),
        ("a valid token", good, True),
    ):
        sent = dict(headers or {})
        sent.pop("Authorization", None)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        status, _ = request(port, path, sent)
        if (status == 200) != ok or (not ok and status not in (401, 403)):
            raise BenchError(f"{name}: GET {path} with {label} answered {status}")


def check_rate_headers(
    name: str, port: int, path: str, limited: bool, headers: dict[str, str]
) -> None:
    """On a limited route RateLimit-Remaining goes down by one per request; elsewhere
    there is none."""
    seen = []
    for _ in range(2):
        status, answer = request(port, path, headers)
        if status != 200:
            raise BenchError(f"{name}: GET {path} answered {status}")
        seen.append(answer.get("ratelimit-remaining"))
    if not limited:
        if seen != [None, None]:
            raise BenchError(f"{name}: RateLimit-Remaining {seen} on {path}, which has no limit")
    elif None in seen or int(seen[0] or 0) - int(seen[1] or 0) != 1:
        raise BenchError(f"{name}: RateLimit-Remaining on {path} went {seen}, not down by one")


def haproxy_command(stats_socket: Path, command: str) -> str:
    """One command on HAProxy's stats socket; its whole answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        try:
            sock.connect(str(stats_socket))
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except OSError as exc:
            raise BenchError(f"HAProxy's stats socket {stats_socket}: {exc}") from None
    return b"".join(chunks).decode(errors="replace")


def check_haproxy_tables(
    stats_socket: Path, limits: Sequence[Limit], keys: Sequence[str]
) -> dict[str, str]:
    """Each limit's table holds its key with a request rate; the entries, by table."""
    entries = {}
    for limit, key in zip(limits, keys, strict=True):
        answer = haproxy_command(stats_socket, f"show table {limit.table}")
        found = [line for line in answer.splitlines() if f"key={key} " in line]
        if not found or "http_req_rate(60000)=0" in found[0]:
            raise BenchError(f"HAProxy's table {limit.table} does not count key {key}:\n{answer}")
        entries[limit.table] = found[0].strip()
    return entries
