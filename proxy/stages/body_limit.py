"""Stage: refuse a declared body over the route's limit before reading it (413).

A chunked body has no declared size; the forwarder counts it as it streams
and stops at the same limit.
"""

from __future__ import annotations

from aiohttp.web_request import BaseRequest

from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.limits import content_length_too_large


def body_limit_stage(request: BaseRequest, ctx: RequestContext) -> None:
    route = ctx.route
    assert route is not None, "the path stage runs first"
    if content_length_too_large(request, route.max_body_size):
        raise Refusal(413, "limit", "body_too_large", "request body too large")
