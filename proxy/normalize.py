"""The one normalized request path.

Routing, auth, the WAF, rate limits and the forwarded request all use the
path `normalize_path` returns, so no stage can see a different path than the
upstream does. The input is the raw path of the request target (before "?").

The rule it keeps: a path that a common backend (Tomcat, Jetty, Spring,
nginx, IIS, Express) would serve as some other path is either rewritten to
that path here, so the route chosen is the one the backend serves, or
refused with 400. What it does, in order, per segment between raw "/"
separators:

- Percent-escapes are decoded only where they stand for an unreserved
  character (A-Z a-z 0-9 - . _ ~, RFC 3986 2.3), so "%7Euser" and "~user" are
  one path. Every other escape stays encoded, with uppercase hex ("%3f" ->
  "%3F"): decoding a reserved character would change what the path means.
- Double encoding is refused: "%25" followed by two hex digits or "u"
  ("%252e", "%25%32%65", "%25u002e") is what a server that decodes twice
  reads as another character.
- Escaped bytes of 0x80 and above must form valid UTF-8 (strictly: overlong
  forms such as "%C0%AE", a "." that lax decoders produce, are refused).
  A character whose compatibility form (NFKC) or case mapping is ASCII is
  refused too: fullwidth "%EF%BC%8F" is "/" and fullwidth letters, the
  Kelvin sign or dotless i are letters to a server that folds them.
- Printable ASCII that may not appear in a URI but that real clients send
  unencoded ('"' < > ^ ` { | } [ ]) is percent-encoded, which means the same to
  any upstream. Spaces, control characters, raw non-ASCII and "?" (the caller
  splits the query off) are refused, and so is "#": a client sends no fragment.
- Path parameters (";" in a segment, "/admin;jsessionid=1") are refused
  unless the route allows them: Tomcat, Jetty and Spring drop them and serve
  "/admin". Where allowed they are kept, and `routing_path` gives the path
  such a server matches ("/admin"), which is what routing uses. "%3B" is
  refused always: servers differ on whether it separates parameters.
- A segment ending in "." ("/admin.", "/admin..."), or starting or ending with
  an escaped space, control or other whitespace character ("/admin%20",
  "/admin%09", "/%0Badmin") is refused: IIS drops trailing dots and spaces,
  and Spring's path matching trims whitespace. An allowed "%2F" or "%5C"
  ends a segment for this rule too ("/admin%20%2Fx" is refused).
- "%2F" (an encoded "/") is refused unless the route allows it, and then kept
  encoded. A backslash, raw or "%5C", follows the same rule and is kept as
  "%5C" when allowed. Routing reads both as separators (`routing_path`),
  since nginx and Windows servers do: "/admin%2Fx" takes the /admin route.
- "." and ".." segments are resolved as RFC 3986 5.2.4 says, never above the
  root. A dot-segment written with escapes ("%2e%2e", ".%2E") is refused unless
  the route allows it, and then resolved like the plain one. A dot-segment
  with parameters ("..;x") is refused: Tomcat-style servers resolve it as "..".
- Empty segments are dropped ("//a///b" -> "/a/b"), as nginx's merge_slashes
  does, so "//admin" cannot slip past a rule for "/admin"; a trailing slash
  is kept ("/a/" stays "/a/", "/a/b/.." is "/a/").
- The request target must be in origin form (start with "/"); the path stage
  takes the path out of an absolute-form target first. Authority form and "*"
  are refused.

The result starts with "/", holds no "." or ".." segment and no empty one
(except for a trailing slash), and normalizing it again with the same flags
returns it unchanged. The flags only ever refuse more: where a stricter call
returns a path at all, it is the path the most lenient call returns.
"""

from __future__ import annotations

import functools
import re
import unicodedata

UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# pchar (RFC 3986 3.3) less "%" and ";": the characters a segment may hold as they are.
_PCHAR = UNRESERVED | frozenset("!$&'()*+,=:@")
# Not allowed in a URI, but sent unencoded by real clients; encoding them changes nothing.
_ENCODE = frozenset('"<>^`{|}[]')
_HEX = frozenset("0123456789abcdefABCDEF")

# The common case: nothing to decode, no parameter, no empty or dot-segment.
_PLAIN = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,=:@/]*")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_DOUBLE_ENCODED = re.compile(r"%25(?:[0-9A-Fa-f]{2}|[uU])")


class BadPath(ValueError):
    """A path that is refused (400); `reason` is a stable code for logs and metrics.

    Reasons: not_absolute, absolute_form, fragment, nul, bad_character,
    bad_percent_encoding, bad_utf8, lookalike_character, double_encoding,
    encoded_slash, encoded_backslash, backslash, encoded_dot_segment,
    dot_segment_params, path_params, encoded_semicolon, trailing_dot,
    edge_whitespace.
    """

    def __init__(self, reason: str, raw: str) -> None:
        super().__init__(f"{reason}: {raw[:200]!r}")
        self.reason = reason


def normalize_path(
    raw: str,
    *,
    allow_encoded_slash: bool = False,
    allow_encoded_dots: bool = False,
    allow_path_params: bool = False,
) -> str:
    if not raw.startswith("/"):
        reason = "absolute_form" if _SCHEME.match(raw) else "not_absolute"
        raise BadPath(reason, raw)
    if (
        _PLAIN.fullmatch(raw)
        and "//" not in raw
        and "/." not in raw
        and "./" not in raw
        and raw[-1] != "."
    ):
        return raw

    out: list[str] = []
    trailing_slash = False
    for segment in raw[1:].split("/"):
        text, dots = _segment(
            segment, raw, allow_encoded_slash, allow_encoded_dots, allow_path_params
        )
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


def routing_path(path: str) -> str:
    """A normalized path as routes match it: the reading under which it is
    most specific. Each segment loses its ";parameters" (Tomcat, Jetty and
    Spring drop them: "/;x/admin;y/" is "/admin/"), and an encoded slash or
    backslash left in by a route's flags is read as a separator (nginx does:
    "/x%2F..%2Fadmin" is "/admin"), with dot-segments resolved again."""
    if ";" not in path and "%2F" not in path and "%5C" not in path:
        return path
    names: list[str] = []
    for segment in path[1:].split("/"):
        names.extend(segment.split(";", 1)[0].replace("%5C", "%2F").split("%2F"))
    kept: list[str] = []
    for name in names:
        if name == "..":
            if kept:
                kept.pop()
        elif name not in ("", "."):
            kept.append(name)
    if not kept:
        return "/"
    return "/" + "/".join(kept) + ("/" if names[-1] in ("", ".", "..") else "")


def _segment(
    segment: str,
    raw: str,
    allow_encoded_slash: bool,
    allow_encoded_dots: bool,
    allow_path_params: bool,
) -> tuple[str, str | None]:
    """(canonical text, "." or ".." when it is a dot-segment, else None)."""
    parts: list[str] = []
    encoded_dot = False
    escaped = False
    name_end = -1  # index in `parts` of the first ";", where the parameters begin
    utf8 = bytearray()  # the run of escaped bytes >= 0x80 being read, to check as UTF-8
    i, n = 0, len(segment)
    while i < n:
        c = segment[i]
        if c == "%":
            pair = segment[i + 1 : i + 3]
            if len(pair) != 2 or not _HEX.issuperset(pair):
                raise BadPath("bad_percent_encoding", raw)
            escaped = True
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
            elif decoded == ";":
                raise BadPath("encoded_semicolon", raw)
            else:
                parts.append("%" + pair.upper())
            continue
        _check_utf8(utf8, raw)
        i += 1
        if c in _PCHAR:
            parts.append(c)
        elif c == ";":
            if name_end < 0:
                name_end = len(parts)
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
    name = "".join(parts[:name_end]) if name_end >= 0 else text
    if name in (".", ".."):
        if name_end >= 0:
            raise BadPath("dot_segment_params", raw)
        if encoded_dot and not allow_encoded_dots:
            raise BadPath("encoded_dot_segment", raw)
        return text, name
    if name_end >= 0 and not allow_path_params:
        raise BadPath("path_params", raw)
    # Where a route lets an encoded slash through, a server may split there too.
    pieces = [name]
    if "%2F" in name or "%5C" in name:  # also a raw backslash, now "%5C"
        pieces = name.replace("%5C", "%2F").split("%2F")
    for piece in pieces:
        if piece.endswith(".") and piece not in (".", ".."):
            raise BadPath("trailing_dot", raw)
    if escaped:
        if "%25" in text and _DOUBLE_ENCODED.search(text):
            raise BadPath("double_encoding", raw)
        for piece in pieces:
            if piece.startswith("%") or piece[-3:-2] == "%":
                _check_edges(piece, raw)
    return text, None


def _check_edges(name: str, raw: str) -> None:
    """Refuse a segment name that starts or ends with escaped whitespace or a control."""
    decoded = _unescape(name)
    if decoded and (_blank(decoded[0]) or _blank(decoded[-1])):
        raise BadPath("edge_whitespace", raw)


def _unescape(text: str) -> str:
    """Decode a canonical segment (every escape already checked, UTF-8 valid)."""
    data = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "%":
            data.append(int(text[i + 1 : i + 3], 16))
            i += 3
        else:
            data.append(ord(text[i]))
            i += 1
    return data.decode("utf-8")


def _blank(ch: str) -> bool:
    """Whitespace, a control or an invisible format character: what servers trim."""
    return ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp")


@functools.lru_cache(maxsize=4096)
def _lookalike(ch: str) -> bool:
    """A non-ASCII character some server reads as ASCII: its NFKC form holds ASCII
    (U+FF0F fullwidth solidus is "/", U+FF41 is "a", U+2026 is "..."), or a case
    mapping is an ASCII letter (U+212A Kelvin sign lowercases to "k", U+0131
    dotless i uppercases to "I", U+0130 lowercases to "i" and a combining mark)."""
    if any(c.isascii() for c in unicodedata.normalize("NFKC", ch)):
        return True
    for mapped in (ch.lower(), ch.upper()):
        if mapped[0].isascii() and all(unicodedata.combining(c) for c in mapped[1:]):
            return True
    return False


def _check_utf8(run: bytearray, raw: str) -> None:
    """End a run of escaped high bytes: strict UTF-8, and no character that
    a server could fold to ASCII."""
    if run:
        try:
            text = run.decode("utf-8", "strict")
        except UnicodeDecodeError:
            raise BadPath("bad_utf8", raw) from None
        run.clear()
        if any(_lookalike(ch) for ch in text):
            raise BadPath("lookalike_character", raw)
