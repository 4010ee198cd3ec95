"""The request body as the WAF inspects it: read up to a limit, then decompressed.

read_body() reads at most `limit` bytes before deciding: a body that ends
within the limit is inspected whole; a larger one (declared or found while
reading) is left for the route's body_over_limit. Whatever was read is kept,
so the forwarder sends it first and then streams the rest.

decode() undoes the Content-Encoding (gzip, deflate, br), never producing
more than `max_size` bytes: a body that would is a decompression bomb.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import cast

from aiohttp.web_request import BaseRequest

from stockade.proxy.limits import BODY_PACE, bounded_body

try:  # brotli is optional: without it a br body cannot be inspected (refused)
    import brotli
except ImportError:  # pragma: no cover - installed with stockade
    brotli = None

ENCODINGS = (
    ("gzip", "x-gzip", "deflate", "br") if brotli is not None else ("gzip", "x-gzip", "deflate")
)
_STEP = 64 * 1024  # decompress in steps, checking the size after each


class BodyDecodeError(ValueError):
    """The body cannot be decoded: `reason` says why, for the refusal."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Bomb(BodyDecodeError):
    pass


@dataclass(frozen=True)
class ReadBody:
    data: bytes  # what was read (the whole body when complete)
    complete: bool  # False: the body is longer than the limit; only a prefix was read


async def read_body(
    request: BaseRequest, limit: int, max_body_size: int, idle_timeout: float
) -> ReadBody:
    """Read the body if it fits in `limit`; raises the limits' BodyError (413/408/400)."""
    declared = request.content_length
    if declared is not None and declared > limit:
        return ReadBody(b"", complete=False)  # known too large: nothing read at all
    chunks: list[bytes] = []
    total = 0
    chunks_in = cast(
        AsyncGenerator[bytes, None],
        # the pace: the whole-body bounds, and the 100 Continue a client may wait for
        bounded_body(request.content, max_body_size, idle_timeout, request.get(BODY_PACE)),
    )
    async with contextlib.aclosing(chunks_in) as stream:
        async for chunk in stream:
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                return ReadBody(b"".join(chunks), complete=False)
    return ReadBody(b"".join(chunks), complete=True)


def encodings(header: str | None) -> list[str]:
    """Content-Encoding codings in the order they were applied (identity dropped)."""
    if not header:
        return []
    return [
        c.strip().lower() for c in header.split(",") if c.strip().lower() not in ("", "identity")
    ]


def _zlib(data: bytes, wbits: int, max_size: int) -> bytes:
    inflater = zlib.decompressobj(wbits)
    out = bytearray()
    pending = data
    while pending:
        out += inflater.decompress(pending, _STEP)
        if len(out) > max_size:
            raise Bomb("decompressed_too_large", f"decompressed body over {max_size} bytes")
        pending = inflater.unconsumed_tail
    out += inflater.flush()
    if len(out) > max_size:
        raise Bomb("decompressed_too_large", f"decompressed body over {max_size} bytes")
    if not inflater.eof or inflater.unused_data:
        raise BodyDecodeError("bad_encoding", "truncated or trailing compressed data")
    return bytes(out)


def _brotli(data: bytes, max_size: int) -> bytes:
    assert brotli is not None
    decoder = brotli.Decompressor()
    out = bytearray(decoder.process(data, output_buffer_limit=_STEP))
    # with output held back, more comes only from empty input
    while len(out) <= max_size and not decoder.can_accept_more_data():
        out += decoder.process(b"", output_buffer_limit=_STEP)
    if len(out) > max_size:
        raise Bomb("decompressed_too_large", f"decompressed body over {max_size} bytes")
    if not decoder.is_finished():
        raise BodyDecodeError("bad_encoding", "truncated brotli data")
    return bytes(out)


def _one(data: bytes, coding: str, max_size: int) -> bytes:
    try:
        if coding in ("gzip", "x-gzip"):
            return _zlib(data, 16 + zlib.MAX_WBITS, max_size)
        if coding == "deflate":
            # RFC 9110 says zlib format; some clients send raw deflate
            try:
                return _zlib(data, zlib.MAX_WBITS, max_size)
            except zlib.error:
                return _zlib(data, -zlib.MAX_WBITS, max_size)
        if coding == "br" and brotli is not None:
            return _brotli(data, max_size)
    except BodyDecodeError:
        raise
    except Exception as exc:  # zlib.error, brotli.error
        raise BodyDecodeError("bad_encoding", f"cannot decode {coding}: {exc}") from None
    raise BodyDecodeError("unsupported_encoding", f"cannot inspect a {coding} body")


def decode(data: bytes, codings: list[str], max_size: int) -> bytes:
    """The body with its codings undone (last applied, first undone)."""
    if len(codings) > 2:
        raise BodyDecodeError("unsupported_encoding", "more than two content codings")
    for coding in reversed(codings):
        data = _one(data, coding, max_size)
    return data
