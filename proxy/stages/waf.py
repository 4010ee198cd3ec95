"""Stage: the web application firewall, on routes with a `waf` mode (proxy/waf/).

After the limits and auth, so that the WAF's work - the costliest of the
checks - is spent only on requests that would otherwise reach the upstream.
"""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp.web_request import BaseRequest

from stockade.proxy.context import RequestContext
from stockade.proxy.limits import BODY_PACE
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.waf.firewall import Waf


def waf_stage(waf: Waf) -> Stage:
    def stage(request: BaseRequest, ctx: RequestContext) -> Awaitable[None] | None:
        route = ctx.route
        assert route is not None, "the path stage runs first"
        if route.waf.mode == "off" or waf.passes_fast(request, ctx, route):
            return None  # no coroutine for routes without a WAF, nor for a fast pass
        if ctx.body is not None:
            # read_body gets only the request: the body's pace rides on it
            request[BODY_PACE] = ctx.body
        return waf.inspect(request, ctx, route)

    return stage
