"""The last stage: send the request to a healthy upstream server and stream back.

Bodies stream both ways in chunks (a 1 GiB upload never sits in memory).
Connections to upstreams are pooled and kept alive per server. A request is
retried on another server only when its method is idempotent and the
connection to the first server failed, so the upstream cannot have seen the
body.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from aiohttp.web_request import BaseRequest
from multidict import CIMultiDict
from yarl import URL

from stockade.proxy.context import UPSTREAM_ERROR, RequestContext
from stockade.proxy.errors import SERVER, Refusal
from stockade.proxy.headers import end_to_end, forwarding_headers
from stockade.proxy.limits import BodyError, bounded_body
from stockade.proxy.settings import Pool, ProxyConfig
from stockade.proxy.upstream import PoolState, ServerState

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class Upstreams:
    """Per worker: one pooled HTTP client and one balancer per upstream pool."""

    def __init__(self, pools: tuple[Pool, ...], states: dict[str, PoolState]) -> None:
        self.pools = {pool.name: pool for pool in pools}
        self.states = states
        self.sessions: dict[str, aiohttp.ClientSession] = {}

    async def start(self) -> None:
        for pool in self.pools.values():
            connector = aiohttp.TCPConnector(
                limit=0,
                limit_per_host=pool.max_connections_per_server,
                keepalive_timeout=pool.keepalive_timeout,
                use_dns_cache=True,
                ttl_dns_cache=60,
            )
            self.sessions[pool.name] = aiohttp.ClientSession(
                connector=connector,
                cookie_jar=aiohttp.DummyCookieJar(),  # never merge cookies across clients
                auto_decompress=False,  # pass bodies through untouched
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
                timeout=aiohttp.ClientTimeout(total=None),
            )

    async def close(self) -> None:
        for session in self.sessions.values():
            await session.close()


async def _counted(chunks: AsyncIterator[bytes], ctx: RequestContext) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        ctx.bytes_in += len(chunk)
        yield chunk


def _body_error(exc: BaseException) -> BodyError | None:
    """The body limit behind an exception, if aiohttp wrapped ours."""
    while exc is not None:
        if isinstance(exc, BodyError):
            return exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def _upstream_headers(request: BaseRequest, ctx: RequestContext) -> CIMultiDict[str]:
    headers = end_to_end(request.headers)
    forwarding_headers(
        headers,
        peer=ctx.peer_ip,
        incoming_xff=request.headers.get("X-Forwarded-For"),
        peer_trusted=ctx.peer_trusted,
        scheme=ctx.scheme,
        host=request.host,
        request_id=ctx.request_id,
    )
    return headers


def _response_headers(upstream: aiohttp.ClientResponse, request_id: str) -> CIMultiDict[str]:
    headers = end_to_end(upstream.headers)
    headers["X-Request-ID"] = request_id
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
        session = self.upstreams.sessions[route.pool]
        has_body = request.body_exists
        attempts = 1 + (route.retries if request.method in IDEMPOTENT else 0)
        tried: set[str] = set()
        headers = _upstream_headers(request, ctx)
        query = request.rel_url.raw_query_string
        timeout = aiohttp.ClientTimeout(
            total=route.total_timeout,
            sock_connect=route.connect_timeout,
            sock_read=route.read_timeout,
        )
        for _ in range(attempts):
            server = state.pick(exclude=tried)
            if server is None:
                if tried:
                    break  # every usable server refused the connection
                raise Refusal(
                    503, UPSTREAM_ERROR, "no_healthy_server", "no healthy upstream server"
                )
            tried.add(server.server.address)
            ctx.upstream = server.server.address
            url = URL.build(
                scheme="http",
                host=server.server.host,
                port=server.server.port,
                path=ctx.path,
                query_string=query,
                encoded=True,
            )
            data = (
                _counted(
                    bounded_body(
                        request.content, route.max_body_size, self.config.body_idle_timeout
                    ),
                    ctx,
                )
                if has_body
                else None
            )
            state.begin(server)
            started = time.monotonic()
            try:
                upstream = await session.request(
                    request.method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    timeout=timeout,
                    compress=None,
                    auto_decompress=False,
                )
            except aiohttp.ClientConnectorError:
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
        if isinstance(exc, TimeoutError):
            return Refusal(504, UPSTREAM_ERROR, "upstream_timeout", "upstream timed out")
        if isinstance(exc, aiohttp.ClientError):
            return Refusal(502, UPSTREAM_ERROR, "upstream_failed", "upstream failed")
        return exc

    async def _relay(
        self,
        request: BaseRequest,
        ctx: RequestContext,
        upstream: aiohttp.ClientResponse,
        started: float,
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            status=upstream.status,
            reason=upstream.reason,
            headers=_response_headers(upstream, ctx.request_id),
        )
        if upstream.content_length is not None and "Content-Length" not in response.headers:
            response.content_length = upstream.content_length
        ctx.upstream_time = time.monotonic() - started
        await response.prepare(request)
        if request.method != "HEAD":
            try:
                async for chunk in upstream.content.iter_any():
                    ctx.bytes_out += len(chunk)
                    await response.write(chunk)
            except (aiohttp.ClientError, TimeoutError):
                # Headers are already sent: all that is left is to cut the
                # connection so the client sees a truncated response.
                ctx.decision, ctx.reason = UPSTREAM_ERROR, "upstream_broke_mid_response"
                if request.transport is not None:
                    request.transport.close()
                return response
        await response.write_eof()
        return response
