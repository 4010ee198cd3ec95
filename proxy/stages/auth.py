"""Stage: authenticate the client for routes that ask for it.

`auth = "jwt"`: an `Authorization: Bearer` token verified against the
configured issuers; `"api_key"`: the API-key header; `"jwt_or_api_key"`:
the API key when one is sent, else the token. Failures follow RFC 6750:
401 with `WWW-Authenticate: Bearer error="invalid_token"` (no error code when
nothing was sent), 403 `insufficient_scope` for a good token without the
scope or claims the route needs. The token never reaches a log.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Mapping
from typing import Any

from aiohttp.web_request import BaseRequest

from stockade.proxy.api_keys import ApiKeyStore
from stockade.proxy.auth_settings import AuthConfig, RouteAuth
from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.jwt_auth import JwtError, JwtVerifier
from stockade.proxy.pipeline_types import Stage

REALM = 'realm="stockade"'


def _challenge(
    status: int, reason: str, error: str | None, description: str, extra: str = ""
) -> Refusal:
    parts = [REALM]
    if error is not None:
        parts.append(f'error="{error}"')
        parts.append(f'error_description="{description}"')
    if extra:
        parts.append(extra)
    refusal = Refusal(status, "auth", reason, description)
    refusal.headers["WWW-Authenticate"] = "Bearer " + ", ".join(parts)
    return refusal


def _bearer(request: BaseRequest) -> str | None:
    value = request.headers.get("Authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise _challenge(401, "malformed", "invalid_request", "expected a Bearer token")
    return token.strip()


def _scopes(claims: Mapping[str, Any]) -> set[str]:
    """OAuth scopes from `scope` (space-separated) or `scp` (a list)."""
    found: set[str] = set()
    scope = claims.get("scope")
    if isinstance(scope, str):
        found.update(scope.split())
    scp = claims.get("scp")
    if isinstance(scp, list):
        found.update(s for s in scp if isinstance(s, str))
    elif isinstance(scp, str):
        found.update(scp.split())
    return found


def _header_value(value: Any) -> str:
    """A claim as a header value; one that would break the header is refused."""
    text = str(value)
    if any(ch in text for ch in "\r\n\0"):
        raise _challenge(401, "bad_claim", "invalid_token", "a claim cannot be forwarded")
    return text


def _claim_matches(claims: Mapping[str, Any], name: str, wanted: str) -> bool:
    value = claims.get(name)
    if isinstance(value, list):
        return wanted in value
    return value is not None and str(value) == wanted


def _authorize(policy: RouteAuth, claims: Mapping[str, Any]) -> None:
    missing = [s for s in policy.required_scopes if s not in _scopes(claims)]
    if missing:
        raise _challenge(
            403,
            "insufficient_scope",
            "insufficient_scope",
            "the token lacks a required scope",
            f'scope="{" ".join(policy.required_scopes)}"',
        )
    for name, wanted in policy.required_claims:
        if not _claim_matches(claims, name, wanted):
            raise _challenge(
                403, "claim_mismatch", "insufficient_scope", f"claim {name} not allowed"
            )


class Authenticator:
    def __init__(self, config: AuthConfig, verifier: JwtVerifier | None, keys: ApiKeyStore) -> None:
        self.config = config
        self.verifier = verifier
        self.keys = keys
        self.failures: Counter[str] = Counter()  # refusals by reason, for status and metrics
        self.plan_claim = "plan"  # the claim naming a JWT consumer's plan ([proxy.quotas])

    def stage(self) -> Stage:
        def auth_stage(request: BaseRequest, ctx: RequestContext) -> Awaitable[None] | None:
            route = ctx.route
            assert route is not None, "the path stage runs first"
            if route.auth.mode == "none":
                return None  # no coroutine at all for open routes
            return self._counted(request, ctx, route.auth)

        return auth_stage

    async def _counted(self, request: BaseRequest, ctx: RequestContext, policy: RouteAuth) -> None:
        try:
            await self._authenticate(request, ctx, policy)
        except Refusal as refusal:
            self.failures[refusal.reason] += 1
            raise

    async def _authenticate(
        self, request: BaseRequest, ctx: RequestContext, policy: RouteAuth
    ) -> None:
        presented_key = request.headers.get(self.config.api_key_header)
        if policy.mode == "api_key" or (policy.mode == "jwt_or_api_key" and presented_key):
            self._check_api_key(presented_key, ctx)
            return
        token = _bearer(request)
        if token is None:
            # RFC 6750 3.1: no error code when the request carried no credentials
            raise _challenge(401, "missing", None, "authentication required")
        if self.verifier is None:
            raise _challenge(401, "no_issuer", "invalid_token", "no issuer configured")
        try:
            claims = await self.verifier.verify(token, policy.issuers or None)
        except JwtError as exc:
            raise _challenge(401, exc.reason, "invalid_token", exc.description) from None
        _authorize(policy, claims)
        ctx.scopes = frozenset(_scopes(claims))  # zero trust checks operations' scopes
        sub = claims.get("sub")
        ctx.consumer = _header_value(sub) if sub is not None else None
        plan = claims.get(self.plan_claim)
        ctx.plan = plan if isinstance(plan, str) else None
        ctx.auth_headers = [
            (header, _header_value(claims[claim]))
            for claim, header in policy.forward_claims
            if claim in claims
        ]
        if ctx.consumer is not None:
            ctx.auth_headers.append((self.config.consumer_header, ctx.consumer))

    def _check_api_key(self, presented: str | None, ctx: RequestContext) -> None:
        if not presented:
            refusal = Refusal(401, "auth", "missing", "an API key is required")
            refusal.headers["WWW-Authenticate"] = f'ApiKey header="{self.config.api_key_header}"'
            raise refusal
        entry = self.keys.verify(presented)
        if entry is None:
            refusal = Refusal(401, "auth", "bad_api_key", "invalid API key")
            refusal.headers["WWW-Authenticate"] = f'ApiKey header="{self.config.api_key_header}"'
            raise refusal
        ctx.consumer, ctx.plan, ctx.api_key_id = entry.consumer, entry.plan, entry.key_id
        ctx.auth_headers = [(self.config.consumer_header, entry.consumer)]
