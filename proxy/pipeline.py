"""The order of the request stages, in one place.

    context -> framing -> path + route -> body limit -> auth -> [WAF, rate limits] -> forward

Each stage either passes the request on or raises a Refusal, which the
context stage answers (JSON, with the request id), logs and counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from stockade.proxy.pipeline_types import Stage
from stockade.proxy.routing import Router
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.stages import context as context_stage
from stockade.proxy.stages.body_limit import body_limit_stage
from stockade.proxy.stages.framing import framing_stage
from stockade.proxy.stages.path import path_stage


def checks(config: ProxyConfig, auth: Stage) -> list[Stage]:
    return [
        framing_stage,
        path_stage(Router(config.routes), config.max_url_length),
        body_limit_stage,
        auth,
        # the WAF and rate-limit stages of later issues go here
    ]


def pipeline(
    config: ProxyConfig,
    scheme: str,
    observe: context_stage.Observer,
    forward: context_stage.Forward,
    auth: Stage,
) -> Callable[[BaseRequest], Awaitable[StreamResponse]]:
    """The request handler for one listener: context, the checks in order, then forward."""
    return context_stage.make(config, scheme, observe, checks(config, auth), forward)
