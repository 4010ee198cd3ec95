"""framing_problem on raw header lines, as aiohttp hands them over."""

from __future__ import annotations

import pytest

from stockade.proxy.smuggling import framing_problem

H = b"Host", b"gateway.test"
CL = b"Content-Length"
TE = b"Transfer-Encoding"
V11 = (1, 1)
BOTH = "content_length_and_transfer_encoding"
DUP_CL = "duplicate_content_length"
BAD_CL = "bad_content_length"
BAD_TE = "unsupported_transfer_encoding"

# (description, raw headers, version, expected reason or None)
TABLE: list[tuple[str, list[tuple[bytes, bytes]], tuple[int, int], str | None]] = [
    ("no body", [H], V11, None),
    ("content-length", [H, (CL, b"5")], V11, None),
    ("content-length 0", [H, (CL, b"0")], V11, None),
    ("leading zeros are digits", [H, (CL, b"005")], V11, None),
    ("2^63 - 1", [H, (CL, b"9223372036854775807")], V11, None),
    ("chunked", [H, (TE, b"chunked")], V11, None),
    ("chunked in any case", [H, (TE, b"Chunked")], V11, None),
    ("lowercase names", [H, (b"transfer-encoding", b"chunked")], V11, None),
    ("HTTP/1.0 with content-length", [H, (CL, b"5")], (1, 0), None),
    ("GET with a body is not smuggling", [H, (CL, b"5")], V11, None),
    ("both", [H, (CL, b"5"), (TE, b"chunked")], V11, BOTH),
    ("both, TE first", [H, (TE, b"chunked"), (CL, b"0")], V11, BOTH),
    ("CL twice, equal", [H, (CL, b"5"), (CL, b"5")], V11, DUP_CL),
    ("CL twice, different", [H, (CL, b"5"), (b"content-length", b"6")], V11, DUP_CL),
    ("CL list", [H, (CL, b"5, 5")], V11, BAD_CL),
    ("CL +5", [H, (CL, b"+5")], V11, BAD_CL),
    ("CL -5", [H, (CL, b"-5")], V11, BAD_CL),
    ("CL ' 5'", [H, (CL, b" 5")], V11, BAD_CL),
    ("CL '5 '", [H, (CL, b"5 ")], V11, BAD_CL),
    ("CL 0x5", [H, (CL, b"0x5")], V11, BAD_CL),
    ("CL empty", [H, (CL, b"")], V11, BAD_CL),
    ("CL 5.0", [H, (CL, b"5.0")], V11, BAD_CL),
    ("CL 1e3", [H, (CL, b"1e3")], V11, BAD_CL),
    ("CL arabic-indic digit", [H, (CL, "\u0665".encode())], V11, BAD_CL),
    ("CL 2^63", [H, (CL, b"9223372036854775808")], V11, BAD_CL),
    ("CL 20 digits", [H, (CL, b"00000000000000000005")], V11, BAD_CL),
    ("CL huge", [H, (CL, b"9" * 40)], V11, BAD_CL),
    ("chunked, chunked", [H, (TE, b"chunked, chunked")], V11, "chunked_twice"),
    ("chunked on two lines", [H, (TE, b"chunked"), (TE, b"chunked")], V11, "chunked_twice"),
    ("gzip, chunked", [H, (TE, b"gzip, chunked")], V11, BAD_TE),
    ("gzip and chunked lines", [H, (TE, b"gzip"), (TE, b"chunked")], V11, BAD_TE),
    ("chunked, gzip", [H, (TE, b"chunked, gzip")], V11, BAD_TE),
    ("identity", [H, (TE, b"identity")], V11, BAD_TE),
    ("identity, chunked", [H, (TE, b"identity, chunked")], V11, BAD_TE),
    ("empty TE", [H, (TE, b"")], V11, BAD_TE),
    ("empty list element", [H, (TE, b", chunked")], V11, BAD_TE),
    ("xchunked", [H, (TE, b"xchunked")], V11, BAD_TE),
    ("chunked with a parameter", [H, (TE, b"chunked;q=1")], V11, BAD_TE),
    ("chunked + vertical tab", [H, (TE, b"chunked\x0b")], V11, BAD_TE),
    ("TE on HTTP/1.0", [H, (TE, b"chunked")], (1, 0), "transfer_encoding_http10"),
    ("obs-fold left in a value", [H, (b"X-A", b"a\r\n b")], V11, "obs_fold"),
    ("bare CR in a value", [H, (b"X-A", b"a\rb")], V11, "obs_fold"),
    ("bare LF in a value", [H, (b"X-A", b"a\nb")], V11, "obs_fold"),
    ("NUL in a value", [H, (b"X-A", b"a\0b")], V11, "bad_header_value"),
    ("space in a name", [H, (b"Content-Length ", b"5")], V11, "bad_header_name"),
    ("tab in a name", [H, (b"\tTransfer-Encoding", b"chunked")], V11, "bad_header_name"),
    ("colon in a name", [H, (b"X:Y", b"z")], V11, "bad_header_name"),
    ("empty name", [H, (b"", b"z")], V11, "bad_header_name"),
    ("HTTP/0.9", [], (0, 9), "unsupported_http_version"),
    ("HTTP/2.0 in a request line", [H], (2, 0), "unsupported_http_version"),
]


@pytest.mark.parametrize(
    ("raw_headers", "version", "expected"), [t[1:] for t in TABLE], ids=[t[0] for t in TABLE]
)
def test_table(
    raw_headers: list[tuple[bytes, bytes]], version: tuple[int, int], expected: str | None
) -> None:
    assert framing_problem(raw_headers, version=version) == expected


def test_version_defaults_to_http11() -> None:
    assert framing_problem([(TE, b"chunked")]) is None
