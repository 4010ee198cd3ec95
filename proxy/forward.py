"""The last stage: send the request to a healthy upstream server and stream back.

Bodies stream both ways in chunks (a 1 GiB upload never sits in memory); a
small response with a Content-Length is sent back in one write. Connections
to upstreams are pooled and kept alive per server (proxy/upstream_client.py).
A request is retried on another server only when its method is idempotent
and the connection to the first server failed, so the upstream cannot have
seen the body.

A server takes at most its pool's maxconn requests at once (per worker); the
rest wait in the pool's queue (proxy/upstream.py) and get 503 queue_full or
queue_timeout if no slot frees in time. A client that leaves mid-request (its
body cut, or hanging up while it waits or while the response streams) ends
the upstream exchange: the connection is closed, never pooled, and the
server is not blamed (the passive checks count only its own failures).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

from stockade.proxy.auth_settings import AuthConfig
from stockade.proxy.context import (
    BEFORE_RESPONSE,
    DURING_RESPONSE,
    UPSTREAM_ERROR,
    ClientAborted,
    RequestContext,
)
from stockade.proxy.errors import SERVER, Refusal
from stockade.proxy.headers import (
    end_to_end,
    end_to_end_pairs,
    forwarded_for,
    forwarding_headers,
    gateway_headers,
)
from stockade.proxy.limits import BodyError, bounded_body
from stockade.proxy.settings import Pool, ProxyConfig
from stockade.proxy.upstream import NoSlot, PoolState, ServerState
from stockade.proxy.upstream_client import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamPool,
    UpstreamResponse,
    UpstreamTimeout,
)

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
# A response this small (with a Content-Length) is read whole and sent with
# its head in one write, instead of streamed chunk by chunk.
SMALL_BODY = 64 * 1024


class Upstreams:
    """Per worker: a balancer per pool, and a keep-alive connection pool per server."""

    def __init__(self, pools: tuple[Pool, ...], states: dict[str, PoolState]) -> None:
        self.states = states
        self.connections: dict[str, UpstreamPool] = {}
        for pool in pools:
            for server in pool.servers:
                self.connections[server.address] = UpstreamPool(
                    server.host,
                    server.port,
                    max_idle=pool.max_connections_per_server,
                    idle_timeout=pool.keepalive_timeout,
                )

    async def close(self) -> None:
        for pool in self.connections.values():
            await pool.close()


async def _counted(chunks: AsyncIterator[bytes], ctx: RequestContext) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        ctx.bytes_in += len(chunk)
        yield chunk


async def _after(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    yield first
    async for chunk in rest:
        yield chunk


def _body(
    request: BaseRequest, ctx: RequestContext, max_size: int, idle_timeout: float
) -> AsyncIterator[bytes]:
    """The request body: what a stage already read (the WAF), then the rest of the stream."""
    first = ctx.body_read
    rest = bounded_body(request.content, max_size - len(first), idle_timeout, ctx.body)
    return _counted(_after(first, rest) if first else rest, ctx)


def _client_fault(exc: BaseException | None) -> BodyError | ClientAborted | None:
    """The client's doing behind an exception (a broken body limit, or its leaving), if any."""
    while exc is not None:
        if isinstance(exc, BodyError | ClientAborted):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _upstream_headers(
    request: BaseRequest, ctx: RequestContext, auth: AuthConfig, identity: frozenset[str]
) -> list[tuple[str, str]]:
    """`identity`: the headers the gateway writes on any route (headers.gateway_headers)."""
    headers = end_to_end(request.headers)
    route = ctx.route
    assert route is not None
    policy = route.auth
    # Headers the gateway vouches for are never taken from the client, on any route.
    for name in identity:
        headers.popall(name, None)
    if policy.mode != "none":
        # The upstream gets exactly the credential that was verified, not the other kind.
        verified, other = "Authorization", auth.api_key_header
        if ctx.api_key_id is not None:
            verified, other = other, verified
        if other.lower() != verified.lower():
            headers.popall(other, None)
    if not policy.forward_authorization:
        headers.popall("Authorization", None)
        headers.popall(auth.api_key_header, None)
    for name, value in ctx.auth_headers:
        headers[name] = value
    # The upstream client frames the body itself (Content-Length or chunked).
    headers.popall("Content-Length", None)
    # The authority the request was routed by (an absolute-form target's wins over
    # Host); empty for an HTTP/1.0 request without Host, as RFC 9112 3.2 says.
    headers["Host"] = ctx.authority
    forwarding_headers(
        headers,
        peer=ctx.peer_ip,
        incoming_xff=forwarded_for(request.headers),
        peer_trusted=ctx.peer_trusted,
        scheme=ctx.scheme,
        host=ctx.authority,
        request_id=ctx.request_id,
    )
    return list(headers.items())


def _response_headers(upstream: UpstreamResponse, ctx: RequestContext) -> CIMultiDict[str]:
    headers = end_to_end_pairs(upstream.headers)
    headers["X-Request-ID"] = ctx.request_id
    for name, value in ctx.response_headers:  # ours (RateLimit-*) win over the upstream's
        headers[name] = value
    headers.setdefault("Server", SERVER)  # the upstream's own, else ours (never aiohttp's)
    return headers


class Forwarder:
    def __init__(self, config: ProxyConfig, upstreams: Upstreams) -> None:
        self.config = config
        self.upstreams = upstreams
        self.identity_headers = gateway_headers(config)

    async def handle(self, request: BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        route = ctx.route
        assert route is not None, "routing runs before forwarding"
        state = self.upstreams.states[route.pool]
        method = request.method
        has_body = request.body_exists
        attempts = 1 + (route.retries if method in IDEMPOTENT else 0)
        headers = _upstream_headers(request, ctx, self.config.auth, self.identity_headers)
        query = request.rel_url.raw_query_string  # as sent: decoding it would change it
        target = f"{ctx.path}?{query}" if query else ctx.path
        if "Expect" in request.headers:
            # The gateway has answered it (100 Continue when it read the body); an
            # upstream that saw it might wait to be asked for a body it already has.
            headers = [(name, value) for name, value in headers if name.lower() != "expect"]
        tried: set[str] = set()
        for _ in range(attempts):
            # Requests already queued for a slot go first (wait_for_server).
            server = state.pick(exclude=tried) if not state.queue else None
            if server is not None:
                state.begin(server)
            else:
                server = await self._wait_for_server(state, tried)
                if server is None:
                    if tried:
                        break  # every usable server refused the connection
                    raise Refusal(
                        503, UPSTREAM_ERROR, "no_healthy_server", "no healthy upstream server"
                    )
            tried.add(server.address)
            ctx.upstream = server.address
            # The server's own outcome, for the passive checks; None (the client
            # left, or broke a limit) counts neither for nor against it.
            verdict: bool | None = None
            try:
                body = (
                    _body(request, ctx, route.max_body_size, self.config.body_idle_timeout)
                    if has_body
                    else None
                )
                started = time.monotonic()
                sending = self.upstreams.connections[server.address].request(
                    method,
                    target,
                    headers,
                    body,
                    content_length=request.content_length if has_body else None,
                    connect_timeout=route.connect_timeout,
                    read_timeout=route.read_timeout,
                )
                try:
                    # total_timeout bounds the time to the response head (the body
                    # then streams with read_timeout between chunks). A timer costs
                    # per request, so it is armed only where it is the tighter bound.
                    if route.total_timeout < route.connect_timeout + route.read_timeout:
                        async with asyncio.timeout(route.total_timeout):
                            upstream = await sending
                    else:
                        upstream = await sending
                except UpstreamConnectError as exc:
                    verdict = False
                    if isinstance(exc, UpstreamTimeout):
                        raise Refusal(
                            504, UPSTREAM_ERROR, "upstream_timeout", "upstream connect timed out"
                        ) from None
                    continue  # nothing reached the server: safe to try another
                except Exception as exc:
                    verdict, refusal = self._refusal(exc)
                    raise refusal from None
                verdict = upstream.status < 500
                try:
                    return await self._relay(request, ctx, upstream, started)
                finally:
                    upstream.release()  # closes the connection unless the exchange completed
            finally:
                state.finish(server, ok=verdict)
        raise Refusal(502, UPSTREAM_ERROR, "upstream_unreachable", "upstream unreachable")

    @staticmethod
    async def _wait_for_server(state: PoolState, tried: set[str]) -> ServerState | None:
        """The slow path: every server is at maxconn (or others wait): queue for a slot."""
        try:
            return await state.wait_for_server(exclude=frozenset(tried))
        except NoSlot as exc:
            refusal = Refusal(
                503, UPSTREAM_ERROR, exc.reason, "upstream servers busy: no free slot in time"
            )
            refusal.headers["Retry-After"] = "1"
            raise refusal from None

    @staticmethod
    def _refusal(exc: Exception) -> tuple[bool | None, Exception]:
        """The server's verdict and what to raise, when the request failed before a response."""
        fault = _client_fault(exc)
        if isinstance(fault, ClientAborted):
            return None, fault  # the context stage logs it (499); there is no one to answer
        if fault is not None:  # the client's body broke a limit: not the server's fault
            return None, Refusal(fault.status, "limit", fault.reason, str(fault))
        if isinstance(exc, UpstreamTimeout | TimeoutError):
            return False, Refusal(504, UPSTREAM_ERROR, "upstream_timeout", "upstream timed out")
        if isinstance(exc, UpstreamError):
            return False, Refusal(502, UPSTREAM_ERROR, "upstream_failed", "upstream failed")
        return None, exc  # the gateway's own failure (a bug): logged as 500 by the context

    async def _relay(
        self,
        request: BaseRequest,
        ctx: RequestContext,
        upstream: UpstreamResponse,
        started: float,
    ) -> web.StreamResponse:
        headers = _response_headers(upstream, ctx)
        ctx.upstream_time = time.monotonic() - started
        length = upstream.content_length
        if request.method != "HEAD" and length is not None and length <= SMALL_BODY:
            try:
                body = await upstream.read()
            except UpstreamError:
                raise Refusal(
                    502, UPSTREAM_ERROR, "upstream_failed", "upstream failed mid-response"
                ) from None
            headers.popall("Content-Length", None)  # web.Response sets it from the body
            ctx.bytes_out = len(body)
            return web.Response(
                status=upstream.status, reason=upstream.reason, headers=headers, body=body
            )
        response = web.StreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        try:
            await response.prepare(request)
        except ConnectionError:  # aiohttp cannot write to a connection the client closed
            raise ClientAborted(BEFORE_RESPONSE) from None
        try:
            if request.method != "HEAD":
                async for chunk in upstream:
                    ctx.bytes_out += len(chunk)
                    await response.write(chunk)
            await response.write_eof()
        except UpstreamError:
            # Headers are already sent: all that is left is to cut the
            # connection so the client sees a truncated response.
            ctx.decision, ctx.reason = UPSTREAM_ERROR, "upstream_broke_mid_response"
            if request.transport is not None:
                request.transport.close()
        except ConnectionError:
            raise ClientAborted(DURING_RESPONSE) from None
        return response
