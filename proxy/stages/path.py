"""Stage: the request target and its Host, the one normalized path, then the route.

Host (RFC 9112 3.2): exactly one (the framing stage refuses a second), and
it must be `host[:port]` as `routing.parse_authority` reads it; an HTTP/1.1
request without one is refused, an HTTP/1.0 request without one is routed
with no host (only routes without `host` take it) and forwarded with an
empty Host. An absolute-form target ("GET http://api.example.com/x") is
accepted as RFC 9112 3.2.2 requires: http or https, no userinfo, and its
authority wins over Host for routing and for the Host the upstream gets;
the upstream gets the path in origin form.

The path is normalized leniently (every route flag on) to choose the route,
matched in its most specific reading (`routing_path`: path parameters
dropped, encoded slashes read as separators), then normalized again with
that route's own flags. The flags only refuse, never reinterpret, so the path the route
was chosen by is the path every later stage and the upstream see.
"""

from __future__ import annotations

import re

from aiohttp.web_request import BaseRequest

from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.normalize import BadPath, normalize_path, routing_path
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.routing import AmbiguousPath, Router, parse_authority

_ABSOLUTE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
_KNOWN_HOSTS = 1024  # valid Host values remembered, so a repeated one is not parsed again


def _bad_request(decision: str, reason: str, message: str) -> Refusal:
    return Refusal(400, decision, reason, message)


def _absolute_form(raw: str, ctx: RequestContext) -> str:
    """Route by an absolute-form target's authority; return its path and query."""
    match = _ABSOLUTE.match(raw)
    if match is None:
        return raw  # authority form, "*" and the like: normalize_path says why not
    scheme, authority = match.groups()
    if scheme.lower() not in ("http", "https"):
        raise _bad_request("host", "bad_scheme", "only http and https targets are served")
    if "@" in authority:
        raise _bad_request("host", "userinfo", "a request target carries no user info")
    host = parse_authority(authority)
    if host is None:
        raise _bad_request("host", "bad_authority", "invalid authority in the request target")
    ctx.host, ctx.authority = host, authority
    rest = raw[match.end() :]
    return rest if rest.startswith("/") else "/" + rest  # "http://h" and "http://h?q" mean "/"


def path_stage(router: Router, max_url_length: int) -> Stage:
    known_hosts: dict[str, str] = {}  # Host value -> routing host

    def routing_host(value: str) -> str:
        host = known_hosts.get(value)
        if host is None:
            host = parse_authority(value)
            if host is None:
                raise _bad_request("host", "bad_host", "invalid Host header")
            if len(known_hosts) >= _KNOWN_HOSTS:
                known_hosts.clear()
            known_hosts[value] = host
        return host

    def stage(request: BaseRequest, ctx: RequestContext) -> None:
        raw = request.raw_path
        if len(raw) > max_url_length:
            raise Refusal(414, "limit", "url_too_long", "request URL too long")
        host_header = request.headers.get("Host")
        if host_header is not None:
            ctx.host, ctx.authority = routing_host(host_header), host_header
        elif request.version >= (1, 1):
            raise _bad_request("host", "missing_host", "an HTTP/1.1 request needs a Host header")
        if raw[:1] != "/":
            raw = _absolute_form(raw, ctx)
        ctx.origin_target = raw
        raw_path = raw.split("?", 1)[0]
        try:
            lenient = normalize_path(
                raw_path, allow_encoded_slash=True, allow_encoded_dots=True, allow_path_params=True
            )
        except BadPath as exc:
            raise _bad_request("path", exc.reason, "invalid request path") from None
        ctx.path = lenient
        try:
            route = router.match(ctx.host, routing_path(lenient))
        except AmbiguousPath:
            raise _bad_request(
                "path", "ambiguous_case", "the path differs from a route's only in case"
            ) from None
        if route is None:
            raise Refusal(404, "route", "no_route", "no route for this host and path")
        if not (route.allow_encoded_slash and route.allow_encoded_dots and route.allow_path_params):
            try:
                ctx.path = normalize_path(
                    raw_path,
                    allow_encoded_slash=route.allow_encoded_slash,
                    allow_encoded_dots=route.allow_encoded_dots,
                    allow_path_params=route.allow_path_params,
                )
            except BadPath as exc:
                raise _bad_request("path", exc.reason, "invalid request path") from None
        ctx.route = route

    return stage
