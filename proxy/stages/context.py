"""Stage 0: give every request its context, run the checks, answer refusals, log and count.

Outermost, so that every outcome - a refusal by any stage, an upstream
error, a crash - gets a request id, a JSON error body and one access-log line.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiohttp import web
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from stockade.proxy.context import RequestContext, request_id_from
from stockade.proxy.errors import Refusal, error_response
from stockade.proxy.headers import client_ip, is_trusted
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

    async def handle(request: BaseRequest) -> StreamResponse:
        peer = request.remote or "-"
        peer_trusted = bool(trusted) and is_trusted(peer, trusted)
        ctx = RequestContext(
            request_id=request_id_from(request.headers.get("X-Request-ID")),
            client_ip=client_ip(peer, request.headers.get("X-Forwarded-For"), trusted)
            if peer_trusted
            else peer,
            peer_ip=peer,
            peer_trusted=peer_trusted,
            scheme=scheme,
        )
        response: StreamResponse
        gauge.inc()
        try:
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
        observe(ctx, request.method)
        return response

    return handle
