"""The [proxy.auth] part of the configuration, and each route's auth policy.

[proxy.auth]
api_keys_file = "/etc/stockade/api_keys.toml"
[proxy.auth.issuers.inhouse]
issuer = "https://idp.example.com/"
audience = ["orders-api"]
algorithms = ["RS256", "ES256"]
jwks_url = "https://idp.example.com/.well-known/jwks.json"   # or none: OpenID discovery

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
from urllib.parse import urlsplit

from stockade.config_fields import ConfigError, Section

AUTH_MODES = ("none", "jwt", "api_key", "jwt_or_api_key")
ALGORITHMS = (
    *("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"),
    *("HS256", "HS384", "HS512"),
)
_HEADER = re.compile(r"[A-Za-z0-9-]{1,64}")
_CLAIM = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Headers a client must never be able to set on the upstream request itself.
RESERVED_HEADERS = ("Host", "Content-Length", "Transfer-Encoding", "Connection", "X-Request-ID")


def http_url_scheme(url: str) -> str | None:
    """The scheme of an absolute http(s) URL with a host and no user info, no whitespace
    or control character ("https" or "http"); None for anything else."""
    if any(ch <= " " or ch == "\x7f" for ch in url):
        return None
    try:
        parts = urlsplit(url)
        _ = parts.port  # ValueError for a port that is not a number in range
    except ValueError:
        return None
    if parts.scheme not in ("https", "http") or not parts.hostname or "@" in parts.netloc:
        return None
    return parts.scheme


def discovery_url(issuer: str) -> str | None:
    """Where an issuer publishes its OpenID provider configuration (OpenID Connect
    Discovery 1.0 section 4: the issuer without its trailing "/", then
    /.well-known/openid-configuration); None when the issuer is not an http(s) URL without
    query or fragment, so that nothing can be discovered from it."""
    if http_url_scheme(issuer) is None or "?" in issuer or "#" in issuer:
        return None
    return issuer.removesuffix("/") + DISCOVERY_PATH


@dataclass(frozen=True)
class Issuer:
    name: str
    issuer: str
    audience: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_url: str | None = None
    key_files: tuple[Path, ...] = ()
    hmac_secret_file: Path | None = None  # the HS256/384/512 secret
    hs256_secret_file: Path | None = None  # the old name of hmac_secret_file
    leeway: float = 30.0
    required_claims: tuple[str, ...] = ("exp",)
    jwks_refresh_interval: float = 300.0
    jwks_timeout: float = 2.0
    jwks_max_age: float = 600.0
    ca_file: Path | None = None  # CAs for the JWKS / discovery fetch; None: the system's

    @property
    def secret_file(self) -> Path | None:
        return self.hmac_secret_file or self.hs256_secret_file


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


def _absolute(section: Section, key: str) -> Path | None:
    value = section.get(key, str, "")
    if not value:
        return None
    if not value.startswith("/"):
        raise ConfigError(f"{section.key(key)}: must be an absolute path, got {value!r}")
    return Path(value)


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
    if jwks_url is not None and http_url_scheme(jwks_url) is None:
        raise ConfigError(f"{section.key('jwks_url')}: must be an http(s) URL")
    key_files = tuple(Path(p) for p in _strings(section, "key_files"))
    for path in key_files:
        if not path.is_absolute():
            raise ConfigError(f"{section.key('key_files')}: {path} must be an absolute path")
    secret_paths = {
        key: _absolute(section, key) for key in ("hmac_secret_file", "hs256_secret_file")
    }
    if all(secret_paths.values()):
        raise ConfigError(
            f"{section.key('hs256_secret_file')}: the old name of hmac_secret_file; set one"
        )
    secret_path = secret_paths["hmac_secret_file"] or secret_paths["hs256_secret_file"]
    hmac_algs = [a for a in algorithms if a.startswith("HS")]
    if hmac_algs and secret_path is None:
        raise ConfigError(
            f"{section.key('hmac_secret_file')}: {'/'.join(hmac_algs)} needs a secret file"
        )
    if secret_path is not None and not hmac_algs:
        raise ConfigError(
            f"{section.key('hmac_secret_file')}: a secret file needs HS256, HS384 or HS512 "
            "in algorithms"
        )
    asymmetric = [a for a in algorithms if not a.startswith("HS")]
    if asymmetric and jwks_url is None and not key_files and discovery_url(issuer) is None:
        raise ConfigError(
            f"{section.name}: give jwks_url or key_files for the public keys, or an http(s) "
            f"issuer URL to find them by OpenID discovery (issuer = {issuer!r})"
        )
    d = Issuer(name, issuer, audience, algorithms)
    refresh_interval = section.duration("jwks_refresh_interval", d.jwks_refresh_interval)
    max_age = section.duration("jwks_max_age", d.jwks_max_age)
    if max_age < refresh_interval:
        raise ConfigError(
            f"{section.key('jwks_max_age')}: {max_age:g}s is shorter than "
            f"jwks_refresh_interval ({refresh_interval:g}s)"
        )
    config = Issuer(
        name=name,
        issuer=issuer,
        audience=audience,
        algorithms=algorithms,
        jwks_url=jwks_url,
        key_files=key_files,
        hmac_secret_file=secret_path,
        leeway=section.duration("leeway", d.leeway, allow_zero=True),
        required_claims=_strings(section, "required_claims", _CLAIM) or d.required_claims,
        jwks_refresh_interval=refresh_interval,
        jwks_timeout=section.duration("jwks_timeout", d.jwks_timeout),
        jwks_max_age=max_age,
        ca_file=_absolute(section, "ca_file"),
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
