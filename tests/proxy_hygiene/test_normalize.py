"""normalize_path: a table of tricky paths, and properties over random ones."""

from __future__ import annotations

import random

import pytest

from stockade.proxy.normalize import BadPath, normalize_path

STRICT: dict[str, bool] = {}
SLASH = {"allow_encoded_slash": True}
DOTS = {"allow_encoded_dots": True}
BOTH = {"allow_encoded_slash": True, "allow_encoded_dots": True}

# (raw path, flags, normalized path or "!reason")
TABLE: list[tuple[str, dict[str, bool], str]] = [
    # plain paths pass unchanged
    ("/", STRICT, "/"),
    ("/api/v1/users", STRICT, "/api/v1/users"),
    ("/a-b_c.d~e/f!$&'()*+,=:@", STRICT, "/a-b_c.d~e/f!$&'()*+,=:@"),
    ("/.well-known/acme", STRICT, "/.well-known/acme"),
    ("/a/...", STRICT, "!trailing_dot"),  # IIS drops trailing dots: "/a/b." is "/a/b"
    ("/a/b.", STRICT, "!trailing_dot"),
    # trailing slash kept; repeated slashes collapsed
    ("/a/", STRICT, "/a/"),
    ("//a", STRICT, "/a"),
    ("//", STRICT, "/"),
    ("/a//b///c//", STRICT, "/a/b/c/"),
    ("//admin", STRICT, "/admin"),
    # dot-segments, RFC 3986 5.2.4, never above the root
    ("/a/./b", STRICT, "/a/b"),
    ("/a/b/../c", STRICT, "/a/c"),
    ("/a/b/..", STRICT, "/a/"),
    ("/a/b/.", STRICT, "/a/b/"),
    ("/..", STRICT, "/"),
    ("/.", STRICT, "/"),
    ("/../../etc/passwd", STRICT, "/etc/passwd"),
    ("/a/../../b/", STRICT, "/b/"),
    ("/api/../admin", STRICT, "/admin"),
    ("/a/.//../b", STRICT, "/b"),
    # unreserved escapes are decoded, mixed case too
    ("/%7Euser", STRICT, "/~user"),
    ("/%41%62%2d%5F%2E%7e", STRICT, "/Ab-_.~"),
    ("/a%2Eb", STRICT, "/a.b"),
    ("/a%2e%2e", STRICT, "!trailing_dot"),
    ("/%2e%2e%2e", STRICT, "!trailing_dot"),
    # other escapes stay, with uppercase hex
    ("/a%3fb", STRICT, "/a%3Fb"),
    ("/a%23b", STRICT, "/a%23b"),
    ("/a%20b", STRICT, "/a%20b"),
    ("/a%25b", STRICT, "/a%25b"),
    ("/%3D%2c", STRICT, "/%3D%2C"),
    ("/%3b", STRICT, "!encoded_semicolon"),
    ("/%0d%0a", STRICT, "!edge_whitespace"),
    ("/a%0d%0ab", STRICT, "/a%0D%0Ab"),
    # double encoding is refused: a server that decodes twice reads another character
    ("/%252e%252e/x", STRICT, "!double_encoding"),
    ("/%252f", STRICT, "!double_encoding"),
    ("/%25%32%65", STRICT, "!double_encoding"),
    ("/%25u002e", STRICT, "!double_encoding"),
    ("/100%25", STRICT, "/100%25"),
    # UTF-8 in escapes: valid kept (uppercased), invalid or overlong refused
    ("/caf%c3%a9", STRICT, "/caf%C3%A9"),
    ("/%E2%82%AC", STRICT, "/%E2%82%AC"),
    ("/%F0%9F%98%80/x", STRICT, "/%F0%9F%98%80/x"),
    ("/%c0%ae%c0%ae/etc", STRICT, "!bad_utf8"),
    ("/%c0%af", STRICT, "!bad_utf8"),
    ("/%e0%80%ae", STRICT, "!bad_utf8"),
    ("/%ed%a0%80", STRICT, "!bad_utf8"),  # a UTF-16 surrogate
    ("/%e9t%e9", STRICT, "!bad_utf8"),  # Latin-1
    ("/%c3", STRICT, "!bad_utf8"),  # truncated
    ("/%c3x%a9", STRICT, "!bad_utf8"),  # split by a raw character
    ("/%c3/%a9", STRICT, "!bad_utf8"),  # split by a separator
    # encoded slash: refused unless allowed, then kept encoded (not a separator)
    ("/a%2Fb", STRICT, "!encoded_slash"),
    ("/a%2fb", STRICT, "!encoded_slash"),
    ("/a%2fb", SLASH, "/a%2Fb"),
    ("/a%2F..%2Fb", SLASH, "/a%2F..%2Fb"),
    ("/x/a%2Fb/..", SLASH, "/x/"),
    # backslash: raw or encoded, refused unless encoded slashes are allowed
    ("/a\\b", STRICT, "!backslash"),
    ("/..\\..\\etc", STRICT, "!backslash"),
    ("/a%5cb", STRICT, "!encoded_backslash"),
    ("/a\\b", SLASH, "/a%5Cb"),
    ("/a%5cb", SLASH, "/a%5Cb"),
    # encoded dot-segments: refused unless allowed, then resolved
    ("/%2e%2e/x", STRICT, "!encoded_dot_segment"),
    ("/a/%2E%2E/x", STRICT, "!encoded_dot_segment"),
    ("/a/.%2e/x", STRICT, "!encoded_dot_segment"),
    ("/a/%2e./x", STRICT, "!encoded_dot_segment"),
    ("/a/%2e/x", STRICT, "!encoded_dot_segment"),
    ("/a/%2e", STRICT, "!encoded_dot_segment"),
    ("/a/b/%2e%2e/x", DOTS, "/a/x"),
    ("/a/%2E/x", DOTS, "/a/x"),
    ("/%2e%2e/%2e%2e/x", DOTS, "/x"),
    ("/a%2f%2e%2e/b", STRICT, "!encoded_slash"),
    ("/a%2f%2e%2e/b", BOTH, "/a%2F../b"),
    # dot-segments with parameters (Tomcat reads "..;" as "..")
    ("/public/..;/admin", STRICT, "!dot_segment_params"),
    ("/public/.;x/admin", STRICT, "!dot_segment_params"),
    ("/public/%2e%2e;/admin", DOTS, "!dot_segment_params"),
    ("/a;b/c", STRICT, "!path_params"),
    ("/a/..x;/b", STRICT, "!path_params"),
    # NUL and bad escapes
    ("/a%00", STRICT, "!nul"),
    ("/a%00.json", BOTH, "!nul"),
    ("/a\x00b", STRICT, "!nul"),
    ("/a%", STRICT, "!bad_percent_encoding"),
    ("/a%4", STRICT, "!bad_percent_encoding"),
    ("/a%zz", STRICT, "!bad_percent_encoding"),
    ("/a%%41", STRICT, "!bad_percent_encoding"),
    ("/%u002e%u002e/x", STRICT, "!bad_percent_encoding"),  # IIS-style %u
    ("/%+1", STRICT, "!bad_percent_encoding"),
    # characters that may not appear in a URI
    ('/a"b<c>d', STRICT, "/a%22b%3Cc%3Ed"),
    ("/a^b`c{d|e}f", STRICT, "/a%5Eb%60c%7Bd%7Ce%7Df"),
    ("/a[0]", STRICT, "/a%5B0%5D"),
    ("/a b", STRICT, "!bad_character"),
    ("/a\tb", STRICT, "!bad_character"),
    ("/a\rb", STRICT, "!bad_character"),
    ("/a\x7fb", STRICT, "!bad_character"),
    ("/caf\u00e9", STRICT, "!bad_character"),
    ("/a?b", STRICT, "!bad_character"),
    ("/a#frag", STRICT, "!fragment"),
    # request targets that are not origin form
    ("", STRICT, "!not_absolute"),
    ("*", STRICT, "!not_absolute"),
    ("a/b", STRICT, "!not_absolute"),
    ("example.com:443", STRICT, "!not_absolute"),
    ("http://evil.example/a/../b", STRICT, "!absolute_form"),
    ("HTTPS://evil.example/", BOTH, "!absolute_form"),
    ("%2fa", SLASH, "!not_absolute"),
]


@pytest.mark.parametrize(("raw", "flags", "expected"), TABLE)
def test_table(raw: str, flags: dict[str, bool], expected: str) -> None:
    if expected.startswith("!"):
        with pytest.raises(BadPath) as excinfo:
            normalize_path(raw, **flags)
        assert excinfo.value.reason == expected[1:]
    else:
        result = normalize_path(raw, **flags)
        assert result == expected
        assert normalize_path(result, **flags) == result


def test_reason_is_in_the_message() -> None:
    with pytest.raises(BadPath, match="encoded_slash: '/a%2Fb'"):
        normalize_path("/a%2Fb")


# Pieces that combine into hostile paths.
PIECES = [
    "/", "/", "/", "//", ".", "..", "%2e", "%2E", "%2f", "%2F", "%5c", "\\", "a", "B", "~",
    "%7e", "%41", "%25", "%252e", "%00", "%", "%4", "%zz", "%c3%a9", "%c0%ae", "%e9", ";",
    ";x", "|", " ", "#", "?", "\u00e9", "%3f", "%20", "-", "_", "@", ":",
]  # fmt: skip


def _random_path(rng: random.Random) -> str:
    return "/" + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))


@pytest.mark.parametrize(
    "flags", [STRICT, SLASH, DOTS, BOTH], ids=["strict", "slash", "dots", "both"]
)
def test_properties_over_random_paths(flags: dict[str, bool]) -> None:
    rng = random.Random(1234)
    accepted = refused = 0
    for _ in range(20_000):
        raw = _random_path(rng)
        try:
            result = normalize_path(raw, **flags)
        except BadPath as exc:
            refused += 1
            assert exc.reason
            continue
        accepted += 1
        # idempotent
        assert normalize_path(result, **flags) == result, raw
        # rooted, no dot-segment, no empty segment but a trailing one
        assert result.startswith("/"), raw
        segments = result[1:].split("/")
        assert "." not in segments and ".." not in segments, (raw, result)
        assert "" not in segments[:-1], (raw, result)
        # nothing a later stage or an upstream could read differently
        assert "\\" not in result and "#" not in result and "?" not in result
        assert "%00" not in result and "%2E" not in result.upper().replace("%252E", "")
        if not flags.get("allow_encoded_slash"):
            assert "%2F" not in result and "%5C" not in result
        # percent-escapes are canonical: two uppercase hex digits
        for i, c in enumerate(result):
            if c == "%":
                assert (
                    result[i + 1 : i + 3].isalnum()
                    and result[i + 1 : i + 3].upper() == result[i + 1 : i + 3]
                ), result
    assert accepted > 1000 and refused > 1000
