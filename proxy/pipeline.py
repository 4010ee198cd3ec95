"""The order of the request stages, in one place.

    context -> framing + single-valued headers -> Host, path + route
        -> source penalties + bot User-Agents
        -> rate limits by IP/header/query -> body limit -> auth
        -> consumer penalties -> consumer and plan limits, quotas -> [WAF] -> forward

Limits known before authentication run before it, so a flood of forged
tokens is refused with a cheap 429 instead of a signature check each.

Each stage either passes the request on or raises a Refusal, which the
context stage answers (JSON, with the request id), logs and counts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from stockade.proxy.headers import single_valued_headers
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.routing import Router
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.stages import context as context_stage
from stockade.proxy.stages.body_limit import body_limit_stage
from stockade.proxy.stages.framing import framing_stage
from stockade.proxy.stages.path import path_stage


@dataclass(frozen=True)
class PolicyStages:
    """The stages a gateway builds from its config (auth, limits, anomaly rules, WAF)."""

    auth: Stage
    ip_penalties: Stage | None = None
    pre_auth_limits: Stage | None = None
    consumer_penalties: Stage | None = None
    post_auth_limits: Stage | None = None
    waf: Stage | None = None  # routes with a waf mode (proxy/stages/waf.py)


def checks(config: ProxyConfig, policy: PolicyStages) -> list[Stage]:
    stages: list[Stage | None] = [
        framing_stage(single_valued_headers(config)),
        path_stage(Router(config.routes), config.max_url_length),
        policy.ip_penalties,
        policy.pre_auth_limits,
        body_limit_stage,
        policy.auth,
        policy.consumer_penalties,
        policy.post_auth_limits,
        policy.waf,
    ]
    return [stage for stage in stages if stage is not None]


def pipeline(
    config: ProxyConfig,
    scheme: str,
    observe: context_stage.Observer,
    forward: context_stage.Forward,
    policy: PolicyStages,
    in_flight: context_stage.InFlight | None = None,
    draining: context_stage.Draining | None = None,
) -> Callable[[BaseRequest], Awaitable[StreamResponse]]:
    """The request handler for one listener: context, the checks in order, then forward."""
    return context_stage.make(
        config, scheme, observe, checks(config, policy), forward, in_flight, draining
    )
