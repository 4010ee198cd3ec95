"""Stage 0: give every request its context, run the checks, answer refusals, log and count.

Outermost, so that every outcome - a refusal by any stage, an upstream
error, a crash, a client that hung up - gets a request id, a JSON error body
and one access-log line.

Expect (RFC 9110 10.1.1): `100-continue` on an HTTP/1.1 request with a body
is answered when something first reads the body (the WAF or the forwarder,
after every check that needs no body); a refusal before that is the final
answer, and the connection is closed since the client may or may not send
the body. Any other expectation gets 417. HTTP/1.0 expectations are ignored.

A client that hangs up is logged once as 499 with the decision client_abort
and the phase as its reason (nobody is left to answer); aiohttp cancels its
handler (handler_kwargs), which ends an upstream exchange it was waiting for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from stockade.proxy.context import (
    BEFORE_RESPONSE,
    CLIENT_ABORT,
    CLIENT_ABORT_STATUS,
    DURING_REQUEST_BODY,
    DURING_RESPONSE,
    ClientAborted,
    RequestContext,
    request_id_from,
)
from stockade.proxy.errors import Refusal, error_response
from stockade.proxy.headers import client_ip, forwarded_for, is_trusted
from stockade.proxy.limits import BodyBounds, BodyPace
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.settings import ProxyConfig

log = logging.getLogger("stockade.proxy")

# Called once per finished request with its context and method (access log, metrics).
Observer = Callable[[RequestContext, str], None]


Forward = Callable[[BaseRequest, RequestContext], Awaitable[StreamResponse]]


class InFlight(Protocol):
    """A count of the requests being handled (proxy.metrics.InFlight)."""

    def inc(self) -> None: ...

    def dec(self) -> None: ...


class Draining:
    """Set when the worker is stopping: every answer closes its connection."""

    active = False


class _NoGauge:
    def inc(self) -> None:
        pass

    def dec(self) -> None:
        pass


def expects_continue(values: Sequence[str]) -> bool | None:
    """What Expect's field lines ask: True for 100-continue, False for nothing (empty
    members only), None for an expectation the gateway cannot meet (417)."""
    found = False
    for value in values:
        for member in value.split(","):
            member = member.strip(" \t").lower()
            if not member:
                continue  # an empty list element (RFC 9110 5.6.1)
            if member != "100-continue":
                return None
            found = True
    return found


def _read_expectation(request: BaseRequest) -> bool:
    """True when the client waits for 100 Continue before sending its body; 417 for an
    expectation the gateway cannot meet."""
    wanted = expects_continue(request.headers.getall("Expect"))
    if wanted is None:
        refusal = Refusal(417, "http", "expectation_failed", "unsupported expectation")
        # The client may be holding its body back for an answer that never comes.
        refusal.close_connection = request.body_exists
        raise refusal
    return wanted and request.version == HttpVersion11 and request.body_exists


def abort_phase(ctx: RequestContext) -> str:
    """How far a request had come when its client hung up."""
    if ctx.upstream_time is not None:
        return DURING_RESPONSE
    if ctx.body is not None and not ctx.body.complete:
        return DURING_REQUEST_BODY
    return BEFORE_RESPONSE


def make(
    config: ProxyConfig,
    scheme: str,
    observe: Observer,
    checks: Sequence[Stage],
    forward: Forward,
    in_flight: InFlight | None = None,
    draining: Draining | None = None,
) -> Callable[[BaseRequest], Awaitable[StreamResponse]]:
    """The whole pipeline for one listener, as aiohttp's low-level request handler."""
    trusted = config.trusted_proxies
    gauge = in_flight if in_flight is not None else _NoGauge()
    drain = draining if draining is not None else Draining()
    body_bounds = BodyBounds.of(config)

    async def handle(request: BaseRequest) -> StreamResponse:
        peer = request.remote or "-"
        peer_trusted = bool(trusted) and is_trusted(peer, trusted)
        ctx = RequestContext(
            request_id=request_id_from(request.headers.get("X-Request-ID")),
            client_ip=client_ip(peer, forwarded_for(request.headers), trusted)
            if peer_trusted
            else peer,
            peer_ip=peer,
            peer_trusted=peer_trusted,
            scheme=scheme,
        )
        response: StreamResponse
        gauge.inc()
        try:
            waits = "Expect" in request.headers and _read_expectation(request)
            if request.body_exists:
                ctx.body = BodyPace(body_bounds, request.transport if waits else None)
            for check in checks:
                waiting = check(request, ctx)
                if waiting is not None:
                    await waiting
            response = await forward(request, ctx)
        except Refusal as refusal:
            ctx.decision, ctx.reason = refusal.decision, refusal.reason
            headers = refusal.headers
            if ctx.response_headers:  # e.g. RateLimit-* from a stage that passed it
                headers = dict(ctx.response_headers) | refusal.headers
            response = error_response(
                refusal.status, refusal.reason, refusal.message, ctx.request_id, headers
            )
            if refusal.close_connection:
                response.force_close()
        except web.HTTPException as exc:  # aiohttp's own (e.g. a bad request line)
            ctx.decision, ctx.reason = "http", exc.reason
            response = error_response(exc.status, "http_error", exc.reason, ctx.request_id)
        except ClientAborted as exc:
            ctx.decision, ctx.reason = CLIENT_ABORT, exc.phase
            # Never delivered (aiohttp drops it quietly): only logged and counted.
            response = error_response(CLIENT_ABORT_STATUS, CLIENT_ABORT, str(exc), ctx.request_id)
            response.force_close()
        except asyncio.CancelledError:
            if request.transport is None:  # the client hung up (see handler_kwargs)
                ctx.decision, ctx.reason = CLIENT_ABORT, abort_phase(ctx)
                ctx.status = CLIENT_ABORT_STATUS
            else:  # a stopping worker gave up on it after drain_timeout
                ctx.decision, ctx.reason, ctx.status = "internal", "cancelled", 503
            ctx.path = ctx.path or request.raw_path.split("?", 1)[0][:256]
            observe(ctx, request.method)
            raise
        except Exception:
            log.exception("request %s failed", ctx.request_id, extra={"request_id": ctx.request_id})
            ctx.decision, ctx.reason = "internal", "internal_error"
            response = error_response(500, "internal_error", "internal error", ctx.request_id)
        finally:
            gauge.dec()
            ctx.path = ctx.path or request.raw_path.split("?", 1)[0][:256]
        ctx.status = response.status
        if drain.active and not response.prepared:
            response.force_close()  # Connection: close; the client reconnects elsewhere
        if ctx.body is not None and ctx.body.continue_pending:
            # Answered without asking for the body the client holds back: it may
            # still send it, or not, so nothing more on this connection can be read.
            response.force_close()
        observe(ctx, request.method)
        return response

    return handle
