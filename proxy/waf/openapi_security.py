"""Zero trust: an OpenAPI document's security requirements, as the route's auth checks them.

openapi-core checks only the presence of an API key or a Basic/Bearer
header, and lets OAuth2 and OpenID Connect requirements through with a
warning. stockade instead maps every scheme an operation requires onto what
the route's auth stage (proxy/stages/auth.py) has already verified:

- http bearer, oauth2, openIdConnect: a JWT verified by the route's auth
  (`jwt`, or `jwt_or_api_key` when the client sent a token); the scopes the
  requirement lists must all be in the token's `scope`/`scp`.
- apiKey in a header: the key verified by the route's auth (`api_key`, or
  `jwt_or_api_key` when the client sent a key), and only if the document's
  header is the one stockade reads ([proxy.auth] api_key_header).

Anything else cannot be checked - http basic or digest (stockade verifies no
passwords), an apiKey in a query or cookie or another header (presence is not
verification), mutualTLS (no client certificates yet), a scheme on a route
whose auth does not verify it - and the document is refused when the config
is loaded, naming the route, the document, the operation and the scheme.

`security` is an OR of requirement objects, each an AND of schemes; an empty
object, or `security: []` on an operation, means open; the document's
top-level `security` is the default for operations without their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

JWT_MODES = ("jwt", "jwt_or_api_key")
API_KEY_MODES = ("api_key", "jwt_or_api_key")
TOKEN = "token"  # a verified JWT
API_KEY = "api_key"  # a verified API key


class SecurityLoadError(ValueError):
    """A requirement the route cannot check; the message names what and why."""


@dataclass(frozen=True)
class RouteAccess:
    """What a route's auth stage verifies, for checking a document against it."""

    route: str
    auth_mode: str  # proxy/auth_settings.py AUTH_MODES
    api_key_header: str  # [proxy.auth] api_key_header


@dataclass(frozen=True)
class Need:
    """One scheme of a requirement: the credential it takes, and the scopes for a token."""

    scheme: str  # the document's name for it
    credential: str  # TOKEN or API_KEY
    scopes: tuple[str, ...] = ()


# An operation's requirements: any one alternative, all of its needs. () is open.
Requirements = tuple[tuple[Need, ...], ...]


@dataclass(frozen=True)
class Presented:
    """The credentials the auth stage verified for a request."""

    api_key: bool  # an API key was verified
    scopes: frozenset[str] | None  # a JWT was verified, with these scopes; None: no JWT


@dataclass(frozen=True)
class SecurityFailure:
    status: int  # 401: credentials of the kind required are missing; 403: scopes
    reason: str
    message: str
    challenge: str  # WWW-Authenticate
    detail: str


def _need(
    access: RouteAccess,
    where: str,
    name: str,
    scopes: list[Any],
    schemes: dict[str, Any],
) -> Need:
    def refuse(why: str) -> SecurityLoadError:
        return SecurityLoadError(f"{where}: security scheme {name!r} cannot be checked: {why}")

    scheme = schemes.get(name)
    if not isinstance(scheme, dict):
        raise refuse("it is not declared in components.securitySchemes")
    kind = str(scheme.get("type", ""))
    if not all(isinstance(s, str) for s in scopes):
        raise refuse("its scopes are not strings")
    if kind in ("oauth2", "openIdConnect") or (
        kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer"
    ):
        if access.auth_mode not in JWT_MODES:
            raise refuse(
                f"{kind} needs a token verified by the route's auth, and the route's auth "
                f'is "{access.auth_mode}" (use auth = "jwt" or "jwt_or_api_key")'
            )
        return Need(name, TOKEN, tuple(scopes))
    if kind == "apiKey":
        place, header = scheme.get("in"), str(scheme.get("name", ""))
        if place != "header":
            raise refuse(
                f"an API key in the {place} is not verified by stockade, only one in the "
                f"{access.api_key_header!r} header (a key merely present is not verified)"
            )
        if header.lower() != access.api_key_header.lower():
            raise refuse(
                f"stockade verifies API keys in the {access.api_key_header!r} header "
                f"([proxy.auth] api_key_header), not in {header!r} (a key merely present "
                "is not verified)"
            )
        if access.auth_mode not in API_KEY_MODES:
            raise refuse(
                f'the route\'s auth is "{access.auth_mode}", which verifies no API key '
                '(use auth = "api_key" or "jwt_or_api_key")'
            )
        if scopes:
            raise refuse("an API key has no roles or scopes to check")
        return Need(name, API_KEY)
    if kind == "http":
        raise refuse(
            f"stockade does not verify HTTP {scheme.get('scheme', '')!s} credentials, "
            "only bearer tokens"
        )
    if kind == "mutualTLS":
        raise refuse("stockade has no client certificates (mutualTLS) to check yet")
    raise refuse(f"unknown scheme type {kind!r}")


def requirements_for(
    default: Any,
    operation: dict[str, Any],
    schemes: dict[str, Any],
    access: RouteAccess,
    where: str,
) -> Requirements:
    """An operation's effective requirements (its own `security`, else the document's
    `default`), each scheme checked against the route's auth; `schemes` are the document's
    securitySchemes, resolved."""
    security = operation.get("security", default)
    if security is None:
        return ()
    if not isinstance(security, list):
        raise SecurityLoadError(f"{where}: security is not a list of requirement objects")
    alternatives: list[tuple[Need, ...]] = []
    for requirement in security:
        if not isinstance(requirement, dict):
            raise SecurityLoadError(f"{where}: a security requirement is not an object")
        if not requirement:
            return ()  # {}: anonymous access is one of the alternatives
        alternatives.append(
            tuple(
                _need(access, where, str(name), list(scopes or []), schemes)
                for name, scopes in requirement.items()
            )
        )
    return tuple(alternatives)


def _met(need: Need, presented: Presented) -> bool:
    if need.credential == API_KEY:
        return presented.api_key
    return presented.scopes is not None and all(s in presented.scopes for s in need.scopes)


def check_security(
    requirements: Requirements, presented: Presented, api_key_header: str, operation: str
) -> SecurityFailure | None:
    """None if one alternative is met; else 401 (no credential of a kind it takes) or 403
    (a token, but without the scopes of any alternative that takes one)."""
    if not requirements or any(
        all(_met(need, presented) for need in alternative) for alternative in requirements
    ):
        return None
    for alternative in requirements:
        kinds_present = all(
            presented.api_key if n.credential == API_KEY else presented.scopes is not None
            for n in alternative
        )
        if kinds_present:
            wanted = sorted({s for n in alternative if n.credential == TOKEN for s in n.scopes})
            return SecurityFailure(
                403,
                "insufficient_scope",
                "the token lacks a scope the operation requires",
                'Bearer realm="stockade", error="insufficient_scope", '
                'error_description="the token lacks a required scope", '
                f'scope="{" ".join(wanted)}"',
                f"{operation}: token scopes lack {' '.join(wanted)} "
                f"(schemes {', '.join(n.scheme for n in alternative)})",
            )
    takes_token = any(n.credential == TOKEN for alt in requirements for n in alt)
    challenge = 'Bearer realm="stockade"' if takes_token else f'ApiKey header="{api_key_header}"'
    names = " or ".join("+".join(n.scheme for n in alt) for alt in requirements)
    return SecurityFailure(
        401,
        "missing_credentials",
        "the operation requires other credentials",
        challenge,
        f"{operation}: needs {names}",
    )
