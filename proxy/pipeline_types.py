"""What a pipeline stage is.

A stage looks at the request and its context and either returns (pass it
on) or raises a Refusal. Synchronous stages are plain functions; a stage
that must wait (a JWKS fetch, the WAF off the loop) returns an awaitable.
Stages are called in order from one middleware rather than each being an
aiohttp middleware, since every middleware layer costs a coroutine per
request and the checks themselves take microseconds.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp.web_request import BaseRequest

from stockade.proxy.context import RequestContext

Stage = Callable[[BaseRequest, RequestContext], Awaitable[None] | None]
