"""The one normalized request path.

Routing, auth, the WAF, rate limits and the forwarded request all use the
path `normalize_path` returns, so no stage can see a different path than the
upstream does. The input is the raw path of the request target (before "?").

What it does, in order, per segment between raw "/" separators:

- Percent-escapes are decoded only where they stand for an unreserved
  character (A-Z a-z 0-9 - . _ ~, RFC 3986 2.3), so "%7Euser" and "~user" are
  one path. Every other escape stays encoded, with uppercase hex ("%3f" ->
  "%3F"): decoding a reserved character would change what the path means.
  A double encoding such as "%252e" is the literal text "%2e" and stays so.
- Escaped bytes of 0x80 and above must form valid UTF-8 (strictly: overlong
  forms such as "%C0%AE", a "." that lax decoders produce, are refused).
- Printable ASCII that may not appear in a URI but that real clients send
  unencoded ('"' < > ^ ` { | } [ ]) is percent-encoded, which means the same to
  any upstream. Spaces, control characters, raw non-ASCII and "?" (the caller
  splits the query off) are refused, and so is "#": a client sends no fragment.
- "%2F" (an encoded "/") is refused unless the route allows it, and then kept
  encoded: it is data, never a separator. A backslash, raw or "%5C", follows
  the same rule and is kept as "%5C" when allowed, because some servers treat
  "\\" as a separator.
- "." and ".." segments are resolved as RFC 3986 5.2.4 says, never above the
  root. A dot-segment written with escapes ("%2e%2e", ".%2E") is refused unless
  the route allows it, and then resolved like the plain one. A dot-segment
  with parameters ("..;x") is refused: Tomcat-style servers resolve it as "..".
- Empty segments are dropped ("//a///b" -> "/a/b"), as nginx's merge_slashes
  does, so "//admin" cannot slip past a rule for "/admin"; a trailing slash
  is kept ("/a/" stays "/a/", "/a/b/.." is "/a/").
- The request target must be in origin form (start with "/"); absolute form
  ("http://host/path"), authority form and "*" are refused.

The result starts with "/", holds no "." or ".." segment and no empty one
(except for a trailing slash), and normalizing it again with the same flags
returns it unchanged.
"""

from __future__ import annotations

import re

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar (RFC 3986 3.3) less "%": the characters a path segment may hold as they are.
_PCHAR = UNRESERVED | frozenset("!$&'()*+,;=:@")
# Not allowed in a URI, but sent unencoded by real clients; encoding them changes nothing.
_ENCODE = frozenset('"<>^`{|}[]')
_HEX = frozenset("0123456789abcdefABCDEF")

# The common case: nothing to decode, no dot-segment, no empty segment.
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


class BadPath(ValueError):
    """A path that is refused (400); `reason` is a stable code for logs and metrics.

    Reasons: not_absolute, absolute_form, fragment, nul, bad_character,
    bad_percent_encoding, bad_utf8, encoded_slash, encoded_backslash, backslash,
    encoded_dot_segment, dot_segment_params.
    """

    def __init__(self, reason: str, raw: str) -> None:
        super().__init__(f"{reason}: {raw[:200]!r}")
        self.reason = reason


def normalize_path(
    raw: str, *, allow_encoded_slash: bool = False, allow_encoded_dots: bool = False
) -> str:
    if not raw.startswith("/"):
        reason = "absolute_form" if _SCHEME.match(raw) else "not_absolute"
        raise BadPath(reason, raw)
    if _PLAIN.fullmatch(raw) and "//" not in raw and "/." not in raw:
        return raw

    out: list[str] = []
    trailing_slash = False
    for segment in raw[1:].split("/"):
        text, dots = _segment(segment, raw, allow_encoded_slash, allow_encoded_dots)
        # A segment that names no resource ("", "." or "..") leaves the path
        # ending in a slash if it is the last one; otherwise the slash goes.
        trailing_slash = dots is not None or not text
        if dots == "..":
            if out:
                out.pop()
        elif dots is None and text:
            out.append(text)
    path = "/" + "/".join(out)
    if trailing_slash and out:
        path += "/"
    return path


def _segment(
    segment: str, raw: str, allow_encoded_slash: bool, allow_encoded_dots: bool
) -> tuple[str, str | None]:
    """(canonical text, "." or ".." when it is a dot-segment, else None)."""
    parts: list[str] = []
    encoded_dot = False
    utf8 = bytearray()  # the run of escaped bytes >= 0x80 being read, to check as UTF-8
    i, n = 0, len(segment)
    while i < n:
        c = segment[i]
        if c == "%":
            pair = segment[i + 1 : i + 3]
            if len(pair) != 2 or not _HEX.issuperset(pair):
                raise BadPath("bad_percent_encoding", raw)
            byte = int(pair, 16)
            i += 3
            if byte >= 0x80:
                utf8.append(byte)
                parts.append("%" + pair.upper())
                continue
            _check_utf8(utf8, raw)
            decoded = chr(byte)
            if decoded in UNRESERVED:
                encoded_dot = encoded_dot or decoded == "."
                parts.append(decoded)
            elif byte == 0:
                raise BadPath("nul", raw)
            elif decoded == "/" and not allow_encoded_slash:
                raise BadPath("encoded_slash", raw)
            elif decoded == "\\" and not allow_encoded_slash:
                raise BadPath("encoded_backslash", raw)
            else:
                parts.append("%" + pair.upper())
            continue
        _check_utf8(utf8, raw)
        i += 1
        if c in _PCHAR:
            parts.append(c)
        elif c in _ENCODE:
            parts.append(f"%{ord(c):02X}")
        elif c == "\\":
            if not allow_encoded_slash:
                raise BadPath("backslash", raw)
            parts.append("%5C")
        elif c == "#":
            raise BadPath("fragment", raw)
        elif c == "\0":
            raise BadPath("nul", raw)
        else:  # space, control characters, "?", raw non-ASCII
            raise BadPath("bad_character", raw)
    _check_utf8(utf8, raw)

    text = "".join(parts)
    name = text.split(";", 1)[0]
    if name not in (".", ".."):
        return text, None
    if name != text:
        raise BadPath("dot_segment_params", raw)
    if encoded_dot and not allow_encoded_dots:
        raise BadPath("encoded_dot_segment", raw)
    return text, name


def _check_utf8(run: bytearray, raw: str) -> None:
    """End a run of escaped high bytes: it must decode as strict UTF-8."""
    if run:
        try:
            run.decode("utf-8", "strict")
        except UnicodeDecodeError:
            raise BadPath("bad_utf8", raw) from None
        run.clear()
