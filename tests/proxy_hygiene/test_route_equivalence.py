"""The route stockade picks is the route the backend serves, or the request is refused.

A model of how Tomcat and Spring read a path: strip ";params" from each segment,
percent-decode once (as UTF-8), resolve dot-segments, merge empty segments, and for
a case-insensitive backend lowercase. For generated paths and a config with a
protected route (/admin) and an open catch-all (/), each with generated flags, the
path stage either refuses the request or picks the route the backend-equivalent
path gets, and forwards a path the backend reads as the same resource.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any
from urllib.parse import unquote, unquote_to_bytes

import pytest
from aiohttp import HttpVersion11
from hypothesis import assume, example, given
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.normalize import BadPath, normalize_path, routing_path
from stockade.proxy.routing import AmbiguousPath, Router
from stockade.proxy.settings import Route
from stockade.proxy.stages.path import path_stage

PROTECTED = "/admin"

# Pieces of paths: names in several cases, parameters, dots, escapes of every
# kind, trailing whitespace and dots, double encoding, separators, lookalikes.
PIECES = [
    "/", "/", "/", "//", "admin", "ADMIN", "Admin", "aDmIn", "%61dmin", "%41DMIN", "admin.",
    "x", "y", ";", ";x=1", ";jsessionid=1", "%3b", "%3B", ".", "..", "%2e", "%2E%2e", ".%2e",
    "%20", "%09", "%0b", "%0c", "%0a", "%c2%a0", "%e3%80%80", "%252e", "%25", "%2561", "%25u002e",
    "%2f", "%2F", "\\", "%5c", "%ef%bd%81", "%ef%bc%8f", "%e2%84%aa", "%c4%b1", "~", "-",
    "%c3%a9", "%c0%ae", "admin%20", "admin;", "..;", "%7e", "adm", "in", "dmin",
]  # fmt: skip


def backend_view(
    raw: str, fold: bool, twice: bool = False, trim: bool = False, slash: bool = False
) -> str | None:
    """The path Tomcat/Spring serve for `raw` (None: such a server refuses it).

    `twice`: the server decodes a second time; `trim`: it also drops whitespace at
    both ends of a segment and trailing dots (Spring's trimTokens, IIS); `slash`:
    it reads a backslash and a decoded %2F or %5C as separators (nginx, IIS).
    """
    segments: list[str] = []
    for name in (segment.split(";", 1)[0] for segment in raw[1:].split("/")):
        if not _valid_escapes(name) or ("\\" in name and not slash):
            return None  # Tomcat refuses bad escapes and backslashes by default
        try:
            decoded = unquote_to_bytes(name).decode("utf-8")
        except UnicodeDecodeError:
            return None
        if "\0" in decoded or (("/" in decoded or "\\" in decoded) and not slash):
            return None  # and %00, %2F and %5C
        if twice:
            decoded = unquote(decoded)
        pieces = decoded.replace("\\", "/").split("/")
        segments.extend(_trimmed(piece) if trim else piece for piece in pieces)
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    last = segments[-1] if segments else ""
    path = "/" + "/".join(out) + ("/" if out and last in ("", ".", "..") else "")
    return path.lower() if fold else path


def _trimmed(piece: str) -> str:
    """Whitespace off both ends and dots off the end, until nothing changes."""
    while True:
        stripped = piece.strip()
        if stripped in (".", ".."):
            return stripped
        stripped = stripped.rstrip(".")
        if stripped == piece:
            return piece
        piece = stripped


def _valid_escapes(name: str) -> bool:
    i = 0
    while (i := name.find("%", i)) >= 0:
        pair = name[i + 1 : i + 3]
        if len(pair) != 2 or any(c not in "0123456789abcdefABCDEF" for c in pair):
            return False
        i += 3
    return True


def backend_route(path: str, admin_folds: bool) -> str:
    """The route whose prefix covers the backend's path (a prefix covers "/admin/" too)."""
    candidate = path.lower() if admin_folds else path
    covered = candidate == PROTECTED or candidate.startswith(PROTECTED + "/")
    return "admin" if covered else "open"


def routes(flags: dict[str, Any]) -> tuple[Route, Route]:
    admin = Route(
        name="admin",
        pool="p",
        path_prefix=flags["admin_prefix"],
        allow_path_params=flags["admin_params"],
        allow_encoded_dots=flags["admin_dots"],
        allow_encoded_slash=flags["admin_slash"],
        case_insensitive=flags["admin_ci"],
    )
    catch_all = Route(
        name="open",
        pool="p",
        path_prefix="/",
        allow_path_params=flags["open_params"],
        allow_encoded_dots=flags["open_dots"],
        allow_encoded_slash=flags["open_slash"],
        case_insensitive=flags["open_ci"],
    )
    return admin, catch_all


def decide(raw: str, flags: dict[str, Any]) -> RequestContext | None:
    """Run the path stage on a request for `raw`: its context, or None when refused."""
    stage = path_stage(Router(routes(flags)), 8190)
    request: Any = SimpleNamespace(
        raw_path=raw,
        headers=CIMultiDictProxy(CIMultiDict([("Host", "t")])),
        version=HttpVersion11,
    )
    ctx = RequestContext("r", "198.18.0.1", "198.18.0.1", False, "http")
    try:
        stage(request, ctx)
    except Refusal as refusal:
        assert refusal.status == 400, (raw, refusal.reason)
        return None
    return ctx


paths = st.lists(st.sampled_from(PIECES), max_size=10).map(lambda p: "/" + "".join(p))
config_flags = st.fixed_dictionaries(
    {
        "admin_prefix": st.sampled_from(["/admin", "/admin/"]),
        "admin_params": st.booleans(),
        "admin_dots": st.booleans(),
        "admin_ci": st.booleans(),
        "admin_slash": st.booleans(),
        "open_params": st.booleans(),
        "open_dots": st.booleans(),
        "open_ci": st.booleans(),
        "open_slash": st.booleans(),
    }
)
STRICT: dict[str, Any] = {
    "admin_prefix": "/admin",
    **dict.fromkeys(
        (
            "admin_params",
            "admin_dots",
            "admin_ci",
            "admin_slash",
            "open_params",
            "open_dots",
            "open_ci",
            "open_slash",
        ),
        False,
    ),
}


@given(raw=paths, flags=config_flags, twice=st.booleans(), trim=st.booleans())
@example(raw="/admin;x=1", flags={**STRICT, "open_params": True}, twice=False, trim=False)
@example(raw="/ADMIN", flags={**STRICT, "open_ci": True}, twice=False, trim=False)
@example(raw="/ADMIN", flags={**STRICT, "admin_ci": True}, twice=False, trim=False)
@example(raw="/;/admin", flags={**STRICT, "open_params": True}, twice=False, trim=False)
@example(raw="/admin", flags={**STRICT, "admin_prefix": "/admin/"}, twice=False, trim=False)
@example(raw="/admin.", flags=STRICT, twice=False, trim=True)
@example(raw="/admin%20", flags=STRICT, twice=False, trim=True)
@example(raw="/%2561dmin", flags=STRICT, twice=True, trim=False)
@example(raw="/admin%2fx", flags={**STRICT, "open_slash": True}, twice=False, trim=False)
@example(raw="/x%2f..%2fadmin", flags={**STRICT, "open_slash": True}, twice=False, trim=False)
@example(raw="/admin%20%2f", flags={**STRICT, "open_slash": True}, twice=False, trim=True)
def test_the_route_picked_is_the_route_the_backend_serves(
    raw: str, flags: dict[str, Any], twice: bool, trim: bool
) -> None:
    # a backend that folds case folds every path it serves; one whose routes take
    # encoded slashes is taken to read them as separators (the worst case)
    fold = flags["admin_ci"] or flags["open_ci"]
    slash = flags["admin_slash"] or flags["open_slash"]
    served = backend_view(raw, fold, twice, trim, slash)
    ctx = decide(raw, flags)
    if ctx is None:
        return  # refused: never a way around a route
    assert ctx.route is not None
    assert served is not None, f"{raw!r} is accepted but a backend refuses it"
    assert ctx.route.name == backend_route(served, fold), (raw, served, flags)
    # what is forwarded is, to the backend, the same resource
    assert backend_view(ctx.path, fold, twice, trim, slash) == served, (raw, ctx.path)


@given(raw=paths, flags=config_flags)
def test_the_flags_only_ever_refuse(raw: str, flags: dict[str, Any]) -> None:
    """The route's own normalization returns the lenient path or refuses: one interpretation."""
    try:
        lenient = normalize_path(
            raw, allow_encoded_slash=True, allow_encoded_dots=True, allow_path_params=True
        )
    except BadPath:
        assume(False)
        return
    admin, catch_all = routes(flags)
    for route in (admin, catch_all):
        try:
            strict = normalize_path(
                raw,
                allow_encoded_slash=route.allow_encoded_slash,
                allow_encoded_dots=route.allow_encoded_dots,
                allow_path_params=route.allow_path_params,
            )
        except BadPath:
            continue
        assert strict == lenient
        assert routing_path(strict) == routing_path(lenient)


@pytest.mark.parametrize(
    ("path", "routed"),
    [
        ("/admin;x=1", "/admin"),
        ("/admin;/", "/admin/"),
        ("/;/admin", "/admin"),
        ("/admin;jsessionid=1/x", "/admin/x"),
        ("/a/;x", "/a/"),
        ("/;", "/"),
        ("/plain/path", "/plain/path"),
        ("/admin%2Fx", "/admin/x"),
        ("/x%2F..%2Fadmin", "/admin"),
        ("/x%5C..%5Cadmin%2F", "/admin/"),
        ("/a%2F.", "/a/"),
        ("/%2F%2F", "/"),
    ],
)
def test_routing_path(path: str, routed: str) -> None:
    assert routing_path(path) == routed


def test_router_prefix_ignores_a_trailing_slash() -> None:
    router = Router(
        (Route(name="admin", pool="p", path_prefix="/admin/"), Route(name="open", pool="p"))
    )
    for path, expected in [
        ("/admin", "admin"),
        ("/admin/", "admin"),
        ("/admin/x", "admin"),
        ("/administrator", "open"),
        ("/ADMIN", "open"),
    ]:
        route = router.match("t", path)
        assert route is not None and route.name == expected, path


def test_router_case_insensitive_and_ambiguous() -> None:
    folding_admin = Router(
        (
            Route(name="open", pool="p"),
            Route(name="admin", pool="p", path_prefix="/Admin", case_insensitive=True),
        )
    )
    for path in ("/admin", "/ADMIN/x", "/aDmIn/"):
        route = folding_admin.match("t", path)
        assert route is not None and route.name == "admin", path
    folding_catch_all = Router(
        (
            Route(name="open", pool="p", case_insensitive=True),
            Route(name="admin", pool="p", path_prefix="/admin"),
            Route(name="other-host", pool="p", host="o.test", path_prefix="/x"),
        )
    )
    with pytest.raises(AmbiguousPath):
        folding_catch_all.match("t", "/ADMIN/x")
    route = folding_catch_all.match("t", "/X")  # /x is another host's route
    assert route is not None and route.name == "open"
    with pytest.raises(AmbiguousPath):
        folding_catch_all.match("o.test", "/X")
