"""Limits on what a client may send, and on how slowly.

aiohttp's parser gives us the size limits; the rest it lacks, so this module
adds them around aiohttp's server:

  limit                            enforced by                   answer
  URL over url_limit()             llhttp (max_line_size)        414, close
  header name or value over
    max_header_size                llhttp (max_field_size)       431, close
  more than max_headers            llhttp (max_headers)          431, close
  any other malformed head         llhttp                        400, close
  head not complete in time        GuardedRequestHandler         408, close
  no byte at all in header_timeout GuardedRequestHandler         close
  TLS handshake not done in
    header_timeout                 TlsServer (proxy/tls.py)      close
  over max_connections             GuardedRequestHandler         503, close
    (TLS: before the handshake)    TlsServer                     close
  keep-alive idle                  aiohttp (keepalive_timeout)   close
  body over max_body_size          content_length_too_large,     413
                                   bounded_body
  body idle over body_idle_timeout bounded_body                  408
  whole body over body_timeout,
    or under body_min_rate         bounded_body (BodyPace)       408
  client gone mid-body             bounded_body                  499 (logged only)
  chunked framing breaks mid-body  GuardedRequestHandler,        400, close
                                   bounded_body

aiohttp answers every parser error with 400 and logs it with a traceback;
GuardedRequestHandler turns the size errors into 414 and 431, answers with the
gateway's JSON error body, logs at debug level (hostile input must not flood
the log) and counts each in LimitCounters.

The header timeout runs from connect for the first request and from the first
byte of each later one, until the parser has the whole head. One case is
left to aiohttp's keep-alive timer: a packet that ends one request's body and
also starts the next head, followed by silence, looks like an idle keep-alive
connection, and is closed after keepalive_timeout (aiohttp closes a connection
that is waiting for a request head after that long, whatever it has received).
On an HTTPS listener the clock starts at accept, before the TLS handshake
(TlsServer in proxy/tls.py): handshake and first head together get
header_timeout, and a connection counts against max_connections from accept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from stockade.proxy.context import DURING_REQUEST_BODY, ClientAborted
from stockade.proxy.errors import error_response
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.tls import HANDSHAKES

log = logging.getLogger("stockade.proxy")

CHUNK = 64 * 1024
# After a response that did not read the whole body (a 413, say), aiohttp reads and
# drops the rest for this long so the client sees the answer and not a reset.
LINGERING_TIME = 2.0
# The shortest request line around a URL: "GET " + URL + " HTTP/1.1".
_REQUEST_LINE_OVERHEAD = len("GET  HTTP/1.1")


@dataclass
class LimitCounters:
    """What the limits refused, per worker; the metrics exporter reads these."""

    connections_active: int = 0  # a gauge: connections open now
    connections_refused: int = 0  # over max_connections: 503 and closed
    header_timeouts: int = 0  # part of a head, not all of it, in header_timeout: 408
    idle_connections_closed: int = 0  # connected and sent nothing in header_timeout
    handshake_timeouts: int = 0  # TLS handshake not done in header_timeout: closed
    url_too_long: int = 0  # 414 from the parser
    headers_too_large: int = 0  # 431: a header line too long, or too many headers
    bad_requests: int = 0  # any other head the parser refused: 400
    bad_bodies: int = 0  # a chunked body whose framing broke mid-way


# One set per worker process: GuardedAppRunner uses it unless given another, so
# max_connections holds across all of a worker's listeners.
WORKER_COUNTERS = LimitCounters()


def url_limit(config: ProxyConfig) -> int:
    """The longest request target accepted (414 beyond).

    max_url_length, and also short enough that the request line fits in
    max_header_size, which bounds a request line as well as a header line.
    """
    return min(config.max_url_length, config.max_header_size - _REQUEST_LINE_OVERHEAD)


def handler_kwargs(config: ProxyConfig) -> dict[str, object]:
    """Keyword arguments for aiohttp's RequestHandler (via AppRunner or Server).

    aiohttp measures max_line_size against the request target alone, and
    max_field_size against a header's name and its value (3.14 means their sum,
    but resets the name's share early, so in effect each on its own).
    url_limit() is always below max_header_size, which is how a LineTooLong
    is told apart as 414 or 431.
    """
    return {
        "max_line_size": url_limit(config),
        "max_field_size": config.max_header_size,
        "max_headers": config.max_headers,
        "keepalive_timeout": config.keepalive_timeout,
        "lingering_time": LINGERING_TIME,
        # Request bodies pass through as sent: decoding them would forward a body
        # that no longer matches its Content-Encoding, and unzip bombs in memory.
        "auto_decompress": False,
        # A client that hangs up cancels its handler, so the upstream request it
        # was waiting for is dropped (its connection closed) instead of holding
        # a connection until the upstream answers (nginx and HAProxy do the same).
        "handler_cancellation": True,
    }


def _raw_response(status: int, phrase: str, reason: str, message: str) -> bytes:
    """A complete JSON error response for writing straight to a transport."""
    request_id = uuid.uuid4().hex
    body = json.dumps(
        {"error": reason, "message": message, "request_id": request_id}, separators=(",", ":")
    ).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        f"X-Request-ID: {request_id}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


_HANDLER = Callable[[BaseRequest], Awaitable[StreamResponse]]


class GuardedServer(web.Server):
    """aiohttp's low-level server whose connections get the limits above."""

    def __init__(
        self,
        handler: _HANDLER,
        config: ProxyConfig,
        counters: LimitCounters | None = None,
        on_connection: Callable[[str], bool] | None = None,
        /,
        **kwargs: Any,
    ) -> None:
        super().__init__(handler, **kwargs)
        self.on_connection = on_connection  # peer IP -> False to refuse (anomaly rules)
        self.header_timeout = config.header_timeout
        self.max_connections = config.max_connections
        self.counters = WORKER_COUNTERS if counters is None else counters

    def __call__(self) -> GuardedRequestHandler:
        # No fallback on a TypeError, unlike aiohttp's: bad handler kwargs are a bug.
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedRequestHandler(RequestHandler):
    """One client connection: connection cap, head timeout, statuses for parser errors.

    Made when the connection is accepted. A plain connection takes its slot in
    connection_made; an HTTPS one at accept, before its handshake (TlsServer in
    proxy/tls.py), so handshakes under way count against max_connections and
    the handshake and the first request head share one header_timeout.
    """

    __slots__ = (
        "_accepted",
        "_connected",
        "_counted",
        "_got_bytes",
        "_guard",
        "_head_timer",
        "_last_payload",
    )

    def __init__(
        self, manager: GuardedServer, *, loop: asyncio.AbstractEventLoop, **kwargs: Any
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._guard = manager
        self._accepted = loop.time()  # header_timeout runs from here
        self._counted = False  # holds one of max_connections
        self._connected = False  # connection_made ran: connection_lost gives the slot back
        self._got_bytes = False
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the latest request the parser began: while it is still
        # arriving, received bytes are body, not the next head.
        self._last_payload: StreamReader | None = None

    def take_slot(self, peer: str | None) -> bool:
        """One of max_connections for this connection; False (counted) over the cap or
        from a source the anomaly rules deny. The caller closes a refused connection."""
        return self._admit(peer) is None

    def _admit(self, peer: str | None) -> str | None:
        guard = self._guard
        counters = guard.counters
        refusal = None
        if counters.connections_active >= guard.max_connections:
            counters.connections_refused += 1
            refusal = "busy"
        elif guard.on_connection is not None and peer and not guard.on_connection(peer):
            refusal = "denied"  # a source denied or banned by a rule (counted by the rules)
        if refusal is not None:
            self._force_close = True  # RequestHandler.data_received drops anything
            return refusal
        counters.connections_active += 1
        self._counted = True
        return None

    def header_deadline(self) -> float:
        """The loop time by which the first request head (after any handshake) must be in."""
        return self._accepted + self._guard.header_timeout

    def handshake_failed(self, timed_out: bool) -> None:
        """TlsServer: the handshake failed or timed out, and the socket is closed."""
        if self._connected:
            return  # it completed after all: connection_lost gives the slot back
        if timed_out:
            self._guard.counters.handshake_timeouts += 1
        self._release()

    def _release(self) -> None:
        # Every way out of an admitted connection ends here, and counts once.
        if self._counted:
            self._counted = False
            self._guard.counters.connections_active -= 1

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            HANDSHAKES.completed(tls)
        if not self._counted:  # a plain connection; an HTTPS one took its slot at accept
            peer = transport.get_extra_info("peername")
            refusal = self._admit(peer[0] if peer else None)
            if refusal is not None:
                if refusal == "busy":
                    cast(asyncio.Transport, transport).write(
                        _raw_response(
                            503, "Service Unavailable", "too_many_connections", "server busy"
                        )
                    )
                transport.close()
                return
        self._connected = True
        super().connection_made(transport)
        # The first head is timed from accept, so that a handshake's time counts too.
        self._arm_head_timer(self.header_deadline() - self._loop.time())

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._last_payload = None
        if not self._connected:
            return  # refused in connection_made: aiohttp never knew of it
        self._connected = False
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._force_close or self._close:
            return
        if self._upgraded or self._payload_parser is not None:
            # Not HTTP/1 heads any more (an upgrade): nothing to time.
            self._cancel_head_timer()
            super().data_received(data)
            return
        self._got_bytes = True
        payload = self._last_payload
        # With no body in progress, these bytes start (or continue) a request head.
        in_head = payload is None or payload.is_eof()
        count = self._request_count
        super().data_received(data)
        if self._request_count == count:
            if in_head and data:
                self._arm_head_timer()
            return
        # The parser produced a request (or an error) from this data: its head is complete.
        self._cancel_head_timer()
        message, new_payload = self._messages[-1]
        if isinstance(message, _ErrInfo) and payload is not None and not payload.is_eof():
            # The parser failed inside the body of a request already being handled
            # (a bad chunk). aiohttp would queue a second, unsolicited 400 and leave
            # that body hanging; fail the body instead, so the handler stops at once
            # and answers, and close the connection after that answer.
            self._messages.pop()
            self._guard.counters.bad_bodies += 1
            payload.set_exception(RequestPayloadError(f"malformed body: {message.message}"))
            payload.feed_eof()
            self.close()
            return
        self._last_payload = new_payload

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        # aiohttp calls this with 400 for every parser error; anything else is
        # a failure in a handler and keeps aiohttp's answer.
        if status != 400 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        counters = self._guard.counters
        if isinstance(exc, LineTooLong) and exc.args[1] == self.max_line_size:
            status, reason, text = 414, "url_too_long", "request URL too long"
            counters.url_too_long += 1
        elif isinstance(exc, LineTooLong) or exc.message.startswith("Too many headers"):
            status, reason, text = 431, "headers_too_large", "request header fields too large"
            counters.headers_too_large += 1
        else:
            status, reason, text = 400, "bad_request", "malformed request"
            counters.bad_requests += 1
        log.debug("refused %s from %s: %s", status, request.remote, exc)
        response = error_response(status, reason, text, uuid.uuid4().hex)
        response.force_close()
        return response

    def _arm_head_timer(self, delay: float | None = None) -> None:
        if self._head_timer is None:
            self._head_timer = self._loop.call_later(
                self._guard.header_timeout if delay is None else max(delay, 0.0),
                self._head_timed_out,
            )

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport is None or self._force_close or self._close:
            return
        counters = self._guard.counters
        if not self._got_bytes:
            counters.idle_connections_closed += 1
            self.force_close()
            return
        counters.header_timeouts += 1
        log.debug("request head not complete in %ss: closing", self._guard.header_timeout)
        idle = self._waiter is not None and not self._waiter.done() and not self._messages
        if idle:
            self.transport.write(
                _raw_response(408, "Request Timeout", "header_timeout", "request head too slow")
            )
            self.force_close()
        else:
            # A pipelined head is trickling in behind a request being answered:
            # finish that answer, then close instead of reading on.
            self.close()


class GuardedAppRunner(web.AppRunner):
    """web.AppRunner whose server is a GuardedServer.

    GuardedAppRunner(app, config, counters=None, /, **aiohttp_kwargs), where the
    keyword arguments are aiohttp's (handler_kwargs(config), access_log=...).
    Give every runner of a worker the same LimitCounters, or none to share
    WORKER_COUNTERS: max_connections counts across all runners sharing one.
    """

    def __init__(
        self,
        app: web.Application,
        config: ProxyConfig,
        counters: LimitCounters | None = None,
        /,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.config = config
        self.counters = WORKER_COUNTERS if counters is None else counters

    async def _make_server(self) -> web.Server:
        # Let aiohttp start the app and assemble the server's arguments, then
        # build the same server as a GuardedServer.
        plain = await super()._make_server()
        return GuardedServer(
            plain.request_handler,
            self.config,
            self.counters,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            loop=plain._loop,
            **plain._kwargs,
        )


class BodyError(Exception):
    """The request body broke a limit; `status` and `reason` are for the refusal."""

    status = 400
    reason = "bad_body"


class BodyTooLarge(BodyError):
    status = 413
    reason = "body_too_large"


class BodyTimeout(BodyError):
    status = 408
    reason = "body_timeout"


class BodyMalformed(BodyError):
    """The chunked framing broke mid-body (see GuardedRequestHandler.data_received)."""

    status = 400
    reason = "bad_body"


class BodyTooSlow(BodyTimeout):
    """The whole body broke body_timeout or body_min_rate (a trickle that is never idle)."""

    status = 408
    reason = "body_too_slow"


class BodyAborted(ClientAborted):
    """The client closed the connection before its body was complete.

    Not a BodyError: no limit was broken and nobody is left to answer, so the
    stages that turn BodyErrors into refusals let it pass up to the context stage.
    """

    def __init__(self, message: str = "client closed the connection mid-body") -> None:
        super().__init__(DURING_REQUEST_BODY, message)


# What a server sends when it wants the body a client holds back with Expect: 100-continue.
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


@dataclass(frozen=True)
class BodyBounds:
    """Bounds on a whole request body ([proxy] body_timeout, body_min_rate, body_rate_grace)."""

    total: float = 0.0  # seconds spent waiting for the body; 0: unbounded
    min_rate: int = 0  # bytes/s once past `grace`; 0: unbounded
    grace: float = 0.0

    @classmethod
    def of(cls, config: ProxyConfig) -> BodyBounds:
        return cls(config.body_timeout, config.body_min_rate, config.body_rate_grace)

    @property
    def active(self) -> bool:
        return self.total > 0 or self.min_rate > 0


class BodyPace:
    """One request body's progress, shared by all that read it (the WAF, then the forwarder).

    Only the time spent waiting for the client's bytes counts against the
    bounds: the gateway's own waits between reads (auth, a queue, a connect)
    are not the client's. After `grace` seconds of waiting, each `min_rate`
    bytes received buys one more second (mod_reqtimeout's MinRate), so a
    body at 1 byte/s is cut at about `grace` however long it is.

    continue_to: the client's transport while its `Expect: 100-continue` is
    unanswered; the first read sends `100 Continue` there, once.
    """

    __slots__ = ("bounds", "complete", "continue_to", "received", "waited")

    def __init__(self, bounds: BodyBounds, continue_to: asyncio.Transport | None = None) -> None:
        self.bounds = bounds
        self.continue_to = continue_to
        self.waited = 0.0
        self.received = 0
        self.complete = False  # the end of the body was read

    @property
    def continue_pending(self) -> bool:
        """The client waits for 100 Continue and has not had it: nothing was read yet."""
        return self.continue_to is not None

    def start(self) -> None:
        """Before a read: answer an Expect: 100-continue, once."""
        transport = self.continue_to
        if transport is not None:
            self.continue_to = None
            if not transport.is_closing():
                transport.write(CONTINUE)

    def time_left(self) -> float:
        """Seconds the client may still keep the gateway waiting for the rest of its body."""
        bounds = self.bounds
        left = bounds.total - self.waited if bounds.total > 0 else math.inf
        if bounds.min_rate > 0:
            left = min(left, bounds.grace + self.received / bounds.min_rate - self.waited)
        return left


def content_length_too_large(request: BaseRequest, max_size: int) -> bool:
    """True when the declared Content-Length is over max_size: refuse before reading."""
    declared = request.content_length
    return declared is not None and declared > max_size


# The pace on the request itself, for readers that get only the request (the WAF's
# read_body); set by the WAF stage just before it reads.
BODY_PACE = web.RequestKey("body_pace", BodyPace)


async def bounded_body(
    stream: StreamReader, max_size: int, idle_timeout: float, pace: BodyPace | None = None
) -> AsyncIterator[bytes]:
    """The body in chunks of at most 64 KiB.

    Raises BodyTooLarge before yielding the chunk that would pass max_size (so
    nothing past the limit is passed on), BodyTimeout when no data arrives for
    idle_timeout seconds, BodyTooSlow when the whole body breaks the pace's
    bounds, BodyMalformed when the chunked framing breaks, BodyAborted when
    the client closes the connection. With a pace, the first read answers an
    Expect: 100-continue. The per-read timer is the only timer: the whole-body
    bounds only shorten it.
    """
    timed = False
    if pace is not None:
        pace.start()
        timed = pace.bounds.active
    total = 0
    began = 0.0
    while True:
        timeout, too_slow = idle_timeout, False
        if timed:
            assert pace is not None
            left = pace.time_left()
            if left <= 0:
                raise BodyTooSlow("request body too slow")
            if left < timeout:
                timeout, too_slow = left, True
            began = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                chunk = await stream.read(CHUNK)
        except TimeoutError:
            if too_slow:
                raise BodyTooSlow("request body too slow") from None
            raise BodyTimeout(f"no body data for {idle_timeout}s") from None
        except RequestPayloadError as exc:
            raise BodyMalformed(str(exc)) from exc
        except OSError as exc:  # aiohttp fails the body with the connection's loss
            raise BodyAborted() from exc
        finally:
            if timed:
                assert pace is not None
                pace.waited += time.monotonic() - began
        if not chunk:
            if pace is not None:
                pace.complete = True
            return
        total += len(chunk)
        if total > max_size:
            raise BodyTooLarge(f"body over {max_size} bytes")
        if pace is not None:
            pace.received += len(chunk)
        yield chunk
