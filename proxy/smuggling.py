"""Request smuggling: refuse any request whose body framing is not unambiguous.

`framing_problem` looks at the raw header lines aiohttp's C parser (llhttp)
already accepted and returns a reason code for a 400, or None. It is the
second of two layers; a request only reaches it if llhttp took it.

What llhttp (aiohttp 3.14, strict mode) already answers with 400 on the wire,
checked by tests/proxy_hygiene/test_smuggling_wire.py:
  Content-Length together with Transfer-Encoding (either order); Content-Length
  twice, even with equal values, or as a list ("5, 5"); a Content-Length that is
  not digits ("+5", "-5", "0x5", "5 5", "", an overflow of 2^64); Transfer-Encoding
  twice or "chunked, chunked"; a final coding other than chunked ("chunked, gzip",
  "identity"); obs-fold (a line starting with SP/HTAB); a bare CR or a bare LF in
  the head; whitespace between a header name and the colon; NUL in a header;
  a bare CR, LF-only line ends or garbage in the chunked body's framing.

What llhttp lets through and this check refuses:
  - "Transfer-Encoding: gzip, chunked" (llhttp reads the body as chunked and
    ignores gzip): we accept no transfer coding but chunked.
  - "Transfer-Encoding:" with an empty value (llhttp reads no body).
  - Transfer-Encoding in an HTTP/1.0 request, which RFC 9112 6.1 says to treat
    as faulty framing (llhttp reads the body as chunked).
  - A Content-Length of 2^63 or more (llhttp takes up to 2^64 - 1).
  - HTTP versions other than 1.0 and 1.1 (llhttp answers "GET /" as HTTP/0.9).
and, should a future parser be laxer, everything in the first list again.

Duplicate Content-Length headers are refused even when the values agree
(RFC 9110 8.6 allows a recipient to merge them): nothing legitimate sends two.
"chunked" is matched case-insensitively, as transfer-coding names are
(RFC 9112 7); leading and trailing whitespace was already removed by llhttp.

A second field line of a header in `single_valued` (the headers the gateway
decides on, proxy/headers.py) is "duplicate_header", reported only when the
framing is otherwise sound, in the same pass over the header lines.

A request with a body on GET (or any method) is not a framing problem.
After refusing, close the connection (response.force_close()): the bytes that
follow a badly framed request are not to be read as the next one.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Sequence

_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
_MAX_CONTENT_LENGTH = (1 << 63) - 1
_SUPPORTED_VERSIONS = ((1, 0), (1, 1))
_FIELD_WHITESPACE = b" \t"
_BAD_NAME = re.compile(rb"[ \t\r\n:\x00]")


def framing_problem(
    raw_headers: Sequence[tuple[bytes, bytes]],
    *,
    version: tuple[int, int] = (1, 1),
    single_valued: Collection[bytes] = frozenset(),
) -> str | None:
    """A reason code when the request's body framing is ambiguous or invalid, else None.

    Pass `version=request.version` so that Transfer-Encoding on HTTP/1.0 and
    unknown versions are refused too, and the lowercase names of the headers
    that may appear only once as `single_valued`.
    """
    if tuple(version) not in _SUPPORTED_VERSIONS:
        return "unsupported_http_version"
    content_lengths: list[bytes] = []
    codings: list[bytes] = []
    te_headers = 0
    seen: set[bytes] = set()
    duplicate = False
    for name, value in raw_headers:
        if b"\r" in value or b"\n" in value:
            return "obs_fold"  # a folded or split line left in a value
        if b"\0" in value:
            return "bad_header_value"
        if not name or _BAD_NAME.search(name):
            return "bad_header_name"
        lname = name.lower()
        if lname in single_valued:
            duplicate = duplicate or lname in seen
            seen.add(lname)
        if lname == _CONTENT_LENGTH:
            content_lengths.append(value)
        elif lname == _TRANSFER_ENCODING:
            te_headers += 1
            codings.extend(c.strip(_FIELD_WHITESPACE).lower() for c in value.split(b","))

    if te_headers:
        if content_lengths:
            return "content_length_and_transfer_encoding"
        if version != (1, 1):
            return "transfer_encoding_http10"
        if codings.count(b"chunked") > 1:
            return "chunked_twice"
        if codings != [b"chunked"]:
            # gzip, identity, an empty value, or chunked not last
            return "unsupported_transfer_encoding"
    if len(content_lengths) > 1:
        return "duplicate_content_length"
    if content_lengths:
        value = content_lengths[0]
        # 1*DIGIT exactly: bytes.isdigit() is ASCII-only, so no signs, spaces, hex or
        # non-ASCII digits; 19 digits is the longest that can fit 2^63 - 1.
        if not value.isdigit() or len(value) > 19 or int(value) > _MAX_CONTENT_LENGTH:
            return "bad_content_length"
    return "duplicate_header" if duplicate else None
