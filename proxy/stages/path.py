"""Stage: the one normalized path, then the route it selects.

The path is normalized leniently to choose the route, then again with that
route's own rules (encoded slashes and dot-segments refused unless the route
allows them), so routing, every later stage and the upstream see one path.
"""

from __future__ import annotations

from aiohttp.web_request import BaseRequest

from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.normalize import BadPath, normalize_path
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.routing import Router, host_without_port


def path_stage(router: Router, max_url_length: int) -> Stage:
    def stage(request: BaseRequest, ctx: RequestContext) -> None:
        raw = request.raw_path
        if len(raw) > max_url_length:
            raise Refusal(414, "limit", "url_too_long", "request URL too long")
        raw_path = raw.split("?", 1)[0]
        try:
            lenient = normalize_path(raw_path, allow_encoded_slash=True, allow_encoded_dots=True)
        except BadPath as exc:
            raise Refusal(400, "path", exc.reason, "invalid request path") from None
        ctx.path = lenient
        ctx.host = host_without_port(request.host)
        route = router.match(ctx.host, lenient)
        if route is None:
            raise Refusal(404, "route", "no_route", "no route for this host and path")
        if not (route.allow_encoded_slash and route.allow_encoded_dots):
            try:
                ctx.path = normalize_path(
                    raw_path,
                    allow_encoded_slash=route.allow_encoded_slash,
                    allow_encoded_dots=route.allow_encoded_dots,
                )
            except BadPath as exc:
                raise Refusal(400, "path", exc.reason, "invalid request path") from None
        ctx.route = route

    return stage
