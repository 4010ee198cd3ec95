"""The [proxy.auth] part of the configuration, and each route's auth policy.

[proxy.auth]
api_keys_file = "/etc/stockade/api_keys.toml"
[proxy.auth.issuers.inhouse]
issuer = "https://idp.example.com/"
audience = ["orders-api"]
algorithms = ["RS256", "ES256"]
jwks_url = "https://idp.example.com/.well-known/jwks.json"

[[proxy.routes]]
auth = "jwt"
required_scopes = ["orders:write"]
forward_claims = { sub = "X-Auth-Sub" }
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stockade.config_fields import ConfigError, Section

AUTH_MODES = ("none", "jwt", "api_key", "jwt_or_api_key")
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA", "HS256")
_HEADER = re.compile(r"[A-Za-z0-9-]{1,64}")
_CLAIM = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
# Headers a client must never be able to set on the upstream request itself.
RESERVED_HEADERS = ("Host", "Content-Length", "Transfer-Encoding", "Connection", "X-Request-ID")


@dataclass(frozen=True)
class Issuer:
    name: str
    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_url: str | None = None
    key_files: tuple[Path, ...] = ()
    hs256_secret_file: Path | None = None
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ("exp",)
    jwks_refresh_interval: float = 300.0
    jwks_timeout: float = 2.0


@dataclass(frozen=True)
class AuthConfig:
    issuers: tuple[Issuer, ...] = ()
    api_keys: tuple[dict[str, Any], ...] = ()  # inline [[proxy.auth.api_keys]] tables
    api_keys_file: Path | None = None
    api_key_header: str = "X-API-Key"
    consumer_header: str = "X-Consumer-ID"
    max_token_size: int = 8192


@dataclass(frozen=True)
class RouteAuth:
    mode: str = "none"
    issuers: tuple[str, ...] = ()  # empty: any configured issuer
    required_scopes: tuple[str, ...] = ()
    required_claims: tuple[tuple[str, str], ...] = ()  # claim = value (or value in a list claim)
    forward_claims: tuple[tuple[str, str], ...] = ()  # claim -> upstream header
    forward_authorization: bool = True
    headers_set: tuple[str, ...] = field(default=())  # every header auth may set upstream


def _strings(section: Section, key: str, pattern: re.Pattern[str] | None = None) -> tuple[str, ...]:
    value = section.get(key, (list, str), [])
    items = [value] if isinstance(value, str) else value
    for item in items:
        if not isinstance(item, str) or (pattern is not None and not pattern.fullmatch(item)):
            raise ConfigError(f"{section.key(key)}: invalid entry {item!r}")
    return tuple(items)


def _issuer(name: str, section: Section) -> Issuer:
    issuer = section.get("issuer", str, "")
    if not issuer:
        raise ConfigError(f"{section.key('issuer')}: required (the expected iss claim)")
    audience = _strings(section, "audience")
    if not audience:
        raise ConfigError(f"{section.key('audience')}: required (at least one accepted aud)")
    algorithms = _strings(section, "algorithms")
    if not algorithms:
        raise ConfigError(f'{section.key("algorithms")}: required, e.g. ["RS256"]')
    for alg in algorithms:
        if alg not in ALGORITHMS:
            raise ConfigError(
                f"{section.key('algorithms')}: {alg!r} is not one of {', '.join(ALGORITHMS)}"
            )
    jwks_url = section.get("jwks_url", str, "") or None
    if jwks_url is not None and not jwks_url.startswith(("https://", "http://")):
        raise ConfigError(f"{section.key('jwks_url')}: must be an http(s) URL")
    key_files = tuple(Path(p) for p in _strings(section, "key_files"))
    for path in key_files:
        if not path.is_absolute():
            raise ConfigError(f"{section.key('key_files')}: {path} must be an absolute path")
    secret = section.get("hs256_secret_file", str, "") or None
    secret_path = Path(secret) if secret else None
    if ("HS256" in algorithms) != (secret_path is not None):
        raise ConfigError(
            f"{section.key('hs256_secret_file')}: HS256 needs a secret file, and a secret "
            "file needs HS256 in algorithms"
        )
    if jwks_url is None and not key_files and algorithms != ("HS256",):
        raise ConfigError(f"{section.name}: give jwks_url or key_files for the public keys")
    d = Issuer(name, issuer, audience, algorithms)
    config = Issuer(
        name=name,
        issuer=issuer,
        audience=audience,
        algorithms=algorithms,
        jwks_url=jwks_url,
        key_files=key_files,
        hs256_secret_file=secret_path,
        leeway=section.duration("leeway", d.leeway, allow_zero=True),
        required_claims=_strings(section, "required_claims", _CLAIM) or d.required_claims,
        jwks_refresh_interval=section.duration("jwks_refresh_interval", d.jwks_refresh_interval),
        jwks_timeout=section.duration("jwks_timeout", d.jwks_timeout),
    )
    section.finish()
    return config


def parse_auth(section: Section) -> AuthConfig:
    issuers_section = section.subsection("issuers")
    issuers = tuple(
        _issuer(name, issuers_section.subsection(name)) for name in sorted(issuers_section.table)
    )
    issuers_section.known.update(issuers_section.table)
    keys = section.get("api_keys", list, [])
    for i, entry in enumerate(keys):
        if not isinstance(entry, dict):
            raise ConfigError(f"{section.key('api_keys')}[{i}]: must be a table")
    d = AuthConfig()
    api_header = section.get("api_key_header", str, d.api_key_header)
    consumer_header = section.get("consumer_header", str, d.consumer_header)
    for key, value in (("api_key_header", api_header), ("consumer_header", consumer_header)):
        if not _HEADER.fullmatch(value):
            raise ConfigError(f"{section.key(key)}: {value!r} is not a header name")
    config = AuthConfig(
        issuers=issuers,
        api_keys=tuple(keys),
        api_keys_file=section.path("api_keys_file", Path())
        if "api_keys_file" in section.table
        else None,
        api_key_header=api_header,
        consumer_header=consumer_header,
        max_token_size=section.integer("max_token_size", d.max_token_size, 256, 1 << 20),
    )
    section.finish()
    return config


def parse_route_auth(section: Section, auth: AuthConfig) -> RouteAuth:
    mode = section.get("auth", str, "none")
    if mode not in AUTH_MODES:
        raise ConfigError(f"{section.key('auth')}: {mode!r} is not one of {', '.join(AUTH_MODES)}")
    names = {i.name for i in auth.issuers}
    issuers = _strings(section, "issuers")
    for name in issuers:
        if name not in names:
            raise ConfigError(f"{section.key('issuers')}: unknown issuer {name!r}")
    if mode in ("jwt", "jwt_or_api_key") and not names:
        raise ConfigError(f"{section.key('auth')}: {mode!r} needs [proxy.auth.issuers.*]")
    claims = section.get("required_claims", dict, {})
    forward = section.get("forward_claims", dict, {})
    for where, table in (("required_claims", claims), ("forward_claims", forward)):
        for k, v in table.items():
            if not _CLAIM.fullmatch(k) or not isinstance(v, str):
                raise ConfigError(f"{section.key(where)}: invalid entry {k!r} = {v!r}")
    for header in forward.values():
        if not _HEADER.fullmatch(header) or header.lower() in (h.lower() for h in RESERVED_HEADERS):
            raise ConfigError(f"{section.key('forward_claims')}: {header!r} cannot be set")
    scopes = _strings(section, "required_scopes", re.compile(r"[!#-\[\]-~]{1,128}"))
    if mode == "none" and (scopes or claims or forward):
        raise ConfigError(f'{section.key("auth")}: scopes and claims need auth = "jwt" or similar')
    return RouteAuth(
        mode=mode,
        issuers=issuers,
        required_scopes=scopes,
        required_claims=tuple(claims.items()),
        forward_claims=tuple(forward.items()),
        forward_authorization=section.get("forward_authorization", bool, True),
        headers_set=(*forward.values(), auth.consumer_header) if mode != "none" else (),
    )
