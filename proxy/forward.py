"""The last stage: send the request to a healthy upstream server and stream back.

Bodies stream both ways in chunks (a 1 GiB upload never sits in memory); a
small response with a Content-Length is sent back in one write. Connections
to upstreams are pooled and kept alive per server (proxy/upstream_client.py).
A request is retried on another server only when its method is idempotent
and the connection to the first server failed, so the upstream cannot have
seen the body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict

from stockade.proxy.auth_settings import AuthConfig
from stockade.proxy.context import UPSTREAM_ERROR, RequestContext
from stockade.proxy.errors import SERVER, Refusal
from stockade.proxy.headers import end_to_end, end_to_end_pairs, forwarding_headers
from stockade.proxy.limits import BodyError, bounded_body
from stockade.proxy.settings import Pool, ProxyConfig
from stockade.proxy.upstream import PoolState, ServerState
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
    rest = bounded_body(request.content, max_size - len(first), idle_timeout)
    return _counted(_after(first, rest) if first else rest, ctx)


def _body_error(exc: BaseException | None) -> BodyError | None:
    """The client-body limit behind an exception, if the failure was the client's."""
    while exc is not None:
        if isinstance(exc, BodyError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _upstream_headers(
    request: BaseRequest, ctx: RequestContext, auth: AuthConfig
) -> list[tuple[str, str]]:
    headers = end_to_end(request.headers)
    route = ctx.route
    assert route is not None
    policy = route.auth
    # Headers the gateway vouches for are never taken from the client, on any route.
    headers.popall(auth.consumer_header, None)
    for name in policy.headers_set:
        headers.popall(name, None)
    if not policy.forward_authorization:
        headers.popall("Authorization", None)
        headers.popall(auth.api_key_header, None)
    for name, value in ctx.auth_headers:
        headers[name] = value
    # The upstream client frames the body itself (Content-Length or chunked).
    headers.popall("Content-Length", None)
    if "Host" not in headers:  # HTTP/1.0 clients may leave it out; HTTP/1.1 upstreams need it
        headers["Host"] = request.host
    forwarding_headers(
        headers,
        peer=ctx.peer_ip,
        incoming_xff=request.headers.get("X-Forwarded-For"),
        peer_trusted=ctx.peer_trusted,
        scheme=ctx.scheme,
        host=request.host,
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

    async def handle(self, request: BaseRequest, ctx: RequestContext) -> web.StreamResponse:
        route = ctx.route
        assert route is not None, "routing runs before forwarding"
        state = self.upstreams.states[route.pool]
        method = request.method
        has_body = request.body_exists
        attempts = 1 + (route.retries if method in IDEMPOTENT else 0)
        headers = _upstream_headers(request, ctx, self.config.auth)
        query = request.rel_url.raw_query_string  # as sent: decoding it would change it
        target = f"{ctx.path}?{query}" if query else ctx.path
        tried: set[str] = set()
        for _ in range(attempts):
            server = state.pick(exclude=tried)
            if server is None:
                if tried:
                    break  # every usable server refused the connection
                raise Refusal(
                    503, UPSTREAM_ERROR, "no_healthy_server", "no healthy upstream server"
                )
            tried.add(server.address)
            ctx.upstream = server.address
            body = (
                _body(request, ctx, route.max_body_size, self.config.body_idle_timeout)
                if has_body
                else None
            )
            state.begin(server)
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
                if isinstance(exc, UpstreamTimeout):
                    state.finish(server, ok=False)
                    raise Refusal(
                        504, UPSTREAM_ERROR, "upstream_timeout", "upstream connect timed out"
                    ) from None
                state.finish(server, ok=False)
                continue  # nothing reached the server: safe to try another
            except Exception as exc:
                raise self._refusal(state, server, exc) from None
            try:
                return await self._relay(request, ctx, upstream, started)
            finally:
                state.finish(server, ok=upstream.status < 500)
                upstream.release()
        raise Refusal(502, UPSTREAM_ERROR, "upstream_unreachable", "upstream unreachable")

    @staticmethod
    def _refusal(state: PoolState, server: ServerState, exc: Exception) -> Exception:
        """What to answer when the upstream request failed before a response."""
        body_error = _body_error(exc)
        if body_error is not None:  # the client's body broke a limit: not the server's fault
            state.finish(server, ok=True)
            return Refusal(body_error.status, "limit", body_error.reason, str(body_error))
        state.finish(server, ok=False)
        if isinstance(exc, UpstreamTimeout | TimeoutError):
            return Refusal(504, UPSTREAM_ERROR, "upstream_timeout", "upstream timed out")
        if isinstance(exc, UpstreamError):
            return Refusal(502, UPSTREAM_ERROR, "upstream_failed", "upstream failed")
        return exc

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
        await response.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in upstream:
                    ctx.bytes_out += len(chunk)
                    await response.write(chunk)
            except UpstreamError:
                # Headers are already sent: all that is left is to cut the
                # connection so the client sees a truncated response.
                ctx.decision, ctx.reason = UPSTREAM_ERROR, "upstream_broke_mid_response"
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response
