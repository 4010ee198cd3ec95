"""The HTTP listener that only sends clients to HTTPS.

Every request, whatever its method and path, gets 308 Permanent Redirect (which keeps the
method and body) to the same host, path and query on the HTTPS port. The Host header is
validated first, so the redirect never reflects garbage into a Location header: a request
without exactly one Host that is a DNS name, an IPv4 or a bracketed IPv6 address, with an
optional port, gets 400.
"""

from __future__ import annotations

import ipaddress
import re

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler

_DNS_NAME = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)(\.(?!-)[a-z0-9_-]{1,63}(?<!-))*\.?")
_PORT = re.compile(r"(:[0-9]{0,5})?")


def redirect_host(value: str) -> str | None:
    """The host part of a Host header, lower-cased and without the port; None if invalid."""
    value = value.lower()
    if value.startswith("["):
        literal, bracket, port = value[1:].partition("]")
        if not bracket or "%" in literal:  # no zone ids: they mean nothing to the client
            return None
        try:
            host = f"[{ipaddress.IPv6Address(literal).compressed}]"
        except ValueError:
            return None
    else:
        host, colon, number = value.partition(":")
        port = colon + number
        if len(host) > 253 or not _DNS_NAME.fullmatch(host):
            return None
    return host if _PORT.fullmatch(port) else None


def redirect_app(https_port: int) -> web.Application:
    """An application answering every request with 308 to https://<host>[:port]<path?query>."""
    if not 0 < https_port < 65536:
        raise ValueError(f"redirect_to_https: {https_port} is not a TCP port")
    port = "" if https_port == 443 else f":{https_port}"

    @web.middleware
    async def redirect(request: web.Request, handler: Handler) -> web.StreamResponse:
        # A middleware that never calls handler: no path can miss a route (404), no method
        # can be refused (405).
        hosts = request.headers.getall(hdrs.HOST, [])
        host = redirect_host(hosts[0]) if len(hosts) == 1 else None
        if host is None:
            return web.Response(status=400, text="400 Bad Request: invalid or missing Host\n")
        target = request.rel_url.raw_path_qs
        if not target.startswith("/"):  # "OPTIONS *" and the like
            target = "/"
        return web.Response(status=308, headers={hdrs.LOCATION: f"https://{host}{port}{target}"})

    return web.Application(middlewares=[redirect])
