"""A lean pooled HTTP/1.1 client for talking to one upstream server.

One `UpstreamPool` per upstream host:port keeps idle keep-alive connections in a
deque; each connection is an `asyncio.Protocol` that parses responses with
httptools (llhttp). It does the little a reverse proxy needs and nothing else:
no URL objects, no cookie jar, no header objects, no redirects, no upgrades.

The caller passes the request head as it should go out, Host included, with the
hop-by-hop and framing headers already removed (forward.py's `end_to_end`); the
only headers added here are the body framing: Content-Length for a bytes body,
Transfer-Encoding: chunked for a streamed body of unknown length.

Errors:
  UpstreamConnectError    connecting failed; nothing was sent, safe to try another server
  UpstreamConnectTimeout  connecting timed out; both a connect error and a timeout
  UpstreamTimeout         the response head or the next body bytes did not come in time (-> 504)
  UpstreamError           anything else after the request may have been sent (-> 502)

Header text is decoded and encoded as UTF-8 with surrogateescape, as aiohttp's
server does, so bytes the client sent reach the upstream unchanged and back.

A connection goes back to the pool when its response was received whole on
the wire (read or not) and llhttp's should_keep_alive() allows it. That is
false for a response with neither length nor chunked framing, so a HEAD answer
without Content-Length costs its connection. Idle connections are checked for
age and for a close by the peer when taken, not by a timer.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import cast

import httptools

from stockade.clock import Clock, SystemClock

# Stop reading from the socket while more than this much body is buffered and
# unread; start again once the consumer has brought it under _LOW_WATER.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# A bytes body up to this size goes out in the same write as the head.
_COALESCE_MAX = 64 * 1024


class UpstreamError(Exception):
    """The request failed after something may have been sent (-> 502)."""


class UpstreamConnectError(UpstreamError):
    """Connecting failed: nothing was sent, so the request may go to another server."""


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer in time (-> 504)."""


class UpstreamConnectTimeout(UpstreamConnectError, UpstreamTimeout):
    """Connecting timed out: nothing was sent (retry elsewhere), and it is a timeout (504)."""


def _expire(waiter: asyncio.Future[None], what: str) -> None:
    if not waiter.done():
        waiter.set_exception(UpstreamTimeout(what))


class _Connection(asyncio.Protocol):
    """One TCP connection and the state of the exchange in flight on it.

    The fields are reset for each request instead of allocating per-request
    state objects. Only one coroutine waits on a connection at a time: first
    request() (sending, then waiting for the head), then the body's consumer.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False  # connection_lost seen, or we closed it
        self.busy = False  # a request is in flight; bytes while idle mean a broken peer
        self.idle_since = 0
        self.reused = False
        self._waiter: asyncio.Future[None] | None = None
        self.write_paused = False
        self.reading_paused = False
        # per exchange
        self.head_only = False  # a HEAD request: the response has no body
        self.received_any = False
        self.head_ready = False
        self.done = False  # the whole response has been received
        self.until_close = False  # the body is delimited by the server closing
        self.keep_alive = False
        self.exc: UpstreamError | None = None
        self.status = 0
        self.reason = ""
        self.headers: list[tuple[str, str]] = []
        self.content_length: int | None = None
        self.chunks: deque[bytes] = deque()
        self.buffered = 0

    def begin(self, head_only: bool) -> None:
        self.busy = True
        self.head_only = head_only
        self.received_any = self.head_ready = self.done = self.until_close = False
        self.keep_alive = False
        self.exc = None
        self.chunks.clear()
        self.buffered = 0

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- waiting ------------------------------------------------------------

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float, what: str) -> None:
        """Wait for the next event on this connection: data, end, error, writable.

        An idle timer, not a deadline: each wait gets the full timeout. The
        caller re-checks the state afterwards.
        """
        waiter = self.loop.create_future()
        self._waiter = waiter
        timer = self.loop.call_later(timeout, _expire, waiter, what)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def fail(self, exc: UpstreamError) -> None:
        if self.exc is None and not self.done:
            self.exc = exc
        self.close()
        self.wake()

    # --- asyncio.Protocol -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport: cast, don't check
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy and not self.done:
            if self.head_ready and self.until_close and exc is None:
                self.done = True  # a close-delimited body ends with the connection
            elif self.exc is None:
                state = "reading the body" if self.head_ready else "before the response head"
                reason = f": {exc}" if exc else ""
                self.exc = UpstreamError(f"upstream closed the connection {state}{reason}")
        self.wake()

    def eof_received(self) -> bool | None:
        return None  # close our side too; connection_lost follows

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self.wake()

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done:
            # Nothing was asked: a server that talks out of turn cannot be trusted
            # to frame the next response either.
            self.close()
            return
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as e:
            if not (self.head_only and self.done):
                self.fail(UpstreamError(f"malformed response from upstream: {e}"))
                return
            self.keep_alive = False  # junk after a HEAD response: done, but not reusable
        if self.head_only and self.done:
            # llhttp does not know the request was HEAD and may still expect a
            # body (Content-Length, chunked): start the next exchange on a new parser.
            self.parser = httptools.HttpResponseParser(self)

    # --- httptools callbacks ----------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            # A second response in the same read: never asked for (no pipelining).
            # The error stops the parser; data_received closes the connection.
            raise UpstreamError("upstream sent an unsolicited response")
        self.reason = ""
        self.headers = []
        self.content_length = None

    def on_status(self, status: bytes) -> None:
        self.reason += status.decode("latin-1")  # may come in pieces

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status == 101:
            # llhttp stops here with an error; fail() keeps this first, clearer reason
            self.exc = UpstreamError("upstream switched protocols; upgrades are not supported")
            return
        if status < 200:
            return  # 100 Continue, 103 Early Hints...: interim, llhttp goes on to the next head
        self.status = status
        chunked = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == "content-length":
                # llhttp has already refused a non-numeric or conflicting value
                self.content_length = int(value)
            elif lname == "transfer-encoding":
                chunked = value.rsplit(",", 1)[-1].strip().lower() == "chunked"
        no_body = self.head_only or status in (204, 304)
        if no_body or chunked:
            self.content_length = None
        # Neither length nor chunked: the body runs until the server closes (RFC 9112 6.3)
        self.until_close = not no_body and not chunked and self.content_length is None
        self.keep_alive = self.parser.should_keep_alive()
        self.head_ready = True
        if self.head_only:
            self.done = True  # whatever follows in this read is junk; see data_received
        self.wake()

    def on_body(self, body: bytes) -> None:
        if self.head_only:
            self.keep_alive = False  # a body after a HEAD response head
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self.reading_paused and self.transport:
            self.reading_paused = True
            self.transport.pause_reading()
        self.wake()

    def on_message_complete(self) -> None:
        if self.parser.get_status_code() < 200 or self.head_only:
            return  # an interim response; or HEAD, already complete at its head
        self.done = True
        self.wake()

    def take(self) -> bytes:
        """The oldest buffered body chunk; resumes reading once the buffer drains."""
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.reading_paused and self.buffered < _LOW_WATER and self.transport:
            self.reading_paused = False
            self.transport.resume_reading()
        return chunk


class UpstreamResponse:
    """A response whose head has arrived; the body streams from the connection.

    Reading the body to its end gives the connection back to the pool by
    itself; call release() in any case (it is idempotent), and always when
    the body is abandoned.
    """

    __slots__ = ("_conn", "_pool", "_read_timeout", "content_length", "headers", "reason", "status")

    def __init__(self, conn: _Connection, pool: UpstreamPool, read_timeout: float) -> None:
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.content_length = conn.content_length
        self._conn: _Connection | None = conn
        self._pool = pool
        self._read_timeout = read_timeout

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet consumed."""
        return 0 if self._conn is None else self._conn.buffered

    async def read(self) -> bytes:
        """The whole body; for small bodies (it is all held in memory)."""
        return b"".join([chunk async for chunk in self])

    def iter_chunks(self) -> AsyncIterator[bytes]:
        return self

    def __aiter__(self) -> UpstreamResponse:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        if conn is None:
            raise StopAsyncIteration
        while True:
            if conn.chunks:
                return conn.take()
            if conn.exc is not None:
                self.release()
                raise conn.exc
            if conn.done:
                self.release()
                raise StopAsyncIteration
            try:
                await conn.wait(self._read_timeout, "upstream sent no body bytes in time")
            except BaseException:
                self.release()  # timed out or cancelled mid-body: the connection is spent
                raise

    def release(self) -> None:
        """Give the connection back to the pool if reusable, else close it. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        self._pool._put_back(conn)


class UpstreamPool:
    """Keep-alive connections to one upstream host:port."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_idle: int = 100,
        idle_timeout: float = 30.0,
        clock: Clock | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self._idle_timeout_ns = int(idle_timeout * 1e9)
        self._clock = clock or SystemClock()
        self._idle: deque[_Connection] = deque()  # oldest on the left, most recent on the right
        self._closed = False

    @property
    def idle_count(self) -> int:
        return len(self._idle)

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: AsyncIterator[bytes] | bytes | None = None,
        *,
        content_length: int | None = None,
        connect_timeout: float = 2.0,
        read_timeout: float = 30.0,
    ) -> UpstreamResponse:
        """Send one request; return once the response head has arrived.

        A connection from the pool may have been closed by the server just as
        it was taken. If it fails before any response byte and the body can be
        sent again (None or bytes), the request is retried once on a new
        connection; a streamed body has been consumed and is not.
        """
        if self._closed:
            raise UpstreamError("the upstream pool is closed")
        lines = [f"{method} {target} HTTP/1.1"]
        lines.extend(f"{name}: {value}" for name, value in headers)
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}")
        elif body is not None:
            if content_length is None:
                lines.append("Transfer-Encoding: chunked")
            else:
                lines.append(f"Content-Length: {content_length}")
        lines.append("\r\n")
        text = "\r\n".join(lines)
        # One CR and one LF per line, and no more: a CR or LF inside a name,
        # value or target would start a header, or a request, of its own.
        if text.count("\n") != len(lines) or text.count("\r") != len(lines):
            raise ValueError("CR or LF in the request line or a header")
        head = text.encode("utf-8", "surrogateescape")
        head_only = method == "HEAD"

        conn = self._take_idle()
        if conn is None:
            conn = await self._connect(connect_timeout)
        try:
            await self._send(conn, head, body, content_length, head_only, read_timeout)
        except UpstreamTimeout:
            raise
        except UpstreamError:
            replayable = body is None or isinstance(body, bytes)
            if not (conn.reused and replayable and not conn.received_any):
                raise
            conn = await self._connect(connect_timeout)
            await self._send(conn, head, body, content_length, head_only, read_timeout)
        return UpstreamResponse(conn, self, read_timeout)

    async def close(self) -> None:
        """Close the idle connections; responses still open close theirs on release()."""
        self._closed = True
        while self._idle:
            self._idle.pop().close()
        await asyncio.sleep(0)  # let the transports run connection_lost

    # --- internals --------------------------------------------------------------

    async def _connect(self, timeout: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop), self.host, self.port
                )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connecting to {self.host}:{self.port} took over {timeout:g}s"
            ) from None
        except OSError as e:
            raise UpstreamConnectError(f"connecting to {self.host}:{self.port}: {e}") from e
        return conn

    async def _send(
        self,
        conn: _Connection,
        head: bytes,
        body: AsyncIterator[bytes] | bytes | None,
        content_length: int | None,
        head_only: bool,
        read_timeout: float,
    ) -> None:
        """Write the request and wait for the response head; on any failure close conn."""
        transport = conn.transport
        assert transport is not None
        conn.begin(head_only)
        try:
            if body is None:
                transport.write(head)
            elif isinstance(body, bytes):
                if len(body) <= _COALESCE_MAX:
                    transport.write(head + body)
                else:
                    transport.write(head)
                    transport.write(body)
            else:
                transport.write(head)
                await self._stream_body(conn, body, content_length, read_timeout)
            while not conn.head_ready:
                if conn.exc is not None:
                    raise conn.exc
                if conn.closed:
                    raise UpstreamError("upstream closed the connection before the response head")
                await conn.wait(read_timeout, "upstream sent no response head in time")
        except BaseException:
            conn.close()
            raise

    async def _stream_body(
        self,
        conn: _Connection,
        body: AsyncIterator[bytes],
        content_length: int | None,
        read_timeout: float,
    ) -> None:
        transport = conn.transport
        assert transport is not None
        chunked = content_length is None
        limit = -1 if content_length is None else content_length  # -1: chunked, no limit
        sent = 0
        async for chunk in body:
            if not chunk:
                continue  # in chunked framing an empty chunk would end the body
            sent += len(chunk)
            # Never put more bytes on the wire than the Content-Length announced:
            # the excess would be read as the start of another request.
            if not chunked and sent > limit:
                raise UpstreamError(f"request body is longer than its Content-Length ({limit})")
            if chunked:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            # Wait while the socket's send buffer is full. If the upstream has
            # answered before the body is complete (say 413 without reading it),
            # stop sending: the request is cut short, so the connection is not reused.
            while conn.write_paused and not conn.head_ready:
                if conn.exc is not None:
                    raise conn.exc
                if conn.closed:
                    raise UpstreamError("upstream closed the connection during the request body")
                await conn.wait(read_timeout, "upstream did not read the request body in time")
            if conn.head_ready and sent != limit:
                conn.keep_alive = False
                return
            if conn.exc is not None:
                raise conn.exc
        if chunked:
            transport.write(b"0\r\n\r\n")
        elif sent != limit:
            raise UpstreamError(
                f"request body is {sent} bytes, not the {limit} of its Content-Length"
            )

    def _take_idle(self) -> _Connection | None:
        """The most recently used live idle connection; discard expired or closed ones."""
        idle = self._idle
        now = self._clock.monotonic_ns()
        while idle and now - idle[0].idle_since > self._idle_timeout_ns:
            idle.popleft().close()  # the oldest are on the left
        while idle:
            conn = idle.pop()
            if not conn.closed:
                conn.reused = True
                return conn
        return None

    def _put_back(self, conn: _Connection) -> None:
        conn.busy = False
        if self._closed or conn.closed or not conn.done or not conn.keep_alive:
            conn.close()
            return
        if conn.reading_paused and conn.transport is not None:
            conn.reading_paused = False
            conn.transport.resume_reading()  # to see the server close it while idle
        conn.chunks.clear()
        conn.buffered = 0
        conn.idle_since = self._clock.monotonic_ns()
        if len(self._idle) >= self.max_idle:
            self._idle.popleft().close()
        self._idle.append(conn)
