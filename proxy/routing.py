"""Routes: host (exact or `*.example.com`) and the longest path prefix win.

A prefix covers itself and everything below it, with or without a trailing
slash: "/admin" and "/admin/" both cover "/admin", "/admin/" and "/admin/x",
never "/administrator" (servers such as Spring and Express serve "/admin" and
"/admin/" alike). A route with `case_insensitive = true` compares the path
in lowercase, for backends that fold case. Because such a backend would also
serve "/ADMIN" as "/admin", a request that reaches a case-insensitive route
while a more specific case-sensitive route matches the same path in
lowercase is ambiguous and refused (`AmbiguousPath`).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass

from stockade.proxy.settings import Route

# RFC 3986 3.2.2 authority without userinfo, as RFC 9112 3.2 allows in Host: an
# IPv6 literal in brackets, or a DNS-style name or IPv4 address; then ":port".
_AUTHORITY = re.compile(
    r"(?:\[([0-9A-Fa-f:.]+)\]|((?:[A-Za-z0-9_-]{1,63}\.)*[A-Za-z0-9_-]{1,63}\.?))"
    r"(?::([0-9]{1,5}))?"
)
_MAX_NAME = 254  # 253 and a trailing dot


class AmbiguousPath(ValueError):
    """A path a case-folding backend would serve as a more specific route's."""


def parse_authority(value: str) -> str | None:
    """The host a Host header or absolute-form authority names, lowercased,
    without its port or a trailing dot (an IPv6 address without brackets);
    None when it is not `host[:port]` (no userinfo, spaces, zone ids, an IPv6
    address without brackets, an empty or out-of-range port)."""
    match = _AUTHORITY.fullmatch(value)
    if match is None:
        return None
    literal, name, port = match.groups()
    if port is not None and int(port) > 65535:
        return None
    if literal is not None:
        try:
            return ipaddress.IPv6Address(literal).compressed
        except ValueError:
            return None
    if len(name) > _MAX_NAME:
        return None
    return name.lower().rstrip(".")


def host_without_port(host_header: str) -> str:
    """`example.com:8443` -> `example.com`; `[fd00::1]:80` -> `fd00::1`."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


@dataclass(frozen=True, slots=True)
class _Entry:
    route: Route
    host: str | None  # None: any host; ".example.com" for "*.example.com"
    dots: int  # the number of dots a host matching the wildcard has
    prefix: str  # without a trailing slash ("" for "/"), lowercase when case-insensitive
    below: str  # prefix + "/"
    folded_prefix: str  # lowercase, to find what a case-folding backend would confuse
    case_insensitive: bool

    def host_matches(self, host: str) -> bool:
        pattern = self.host
        if pattern is None:
            return True
        if pattern[0] == ".":
            return host.endswith(pattern) and host.count(".") == self.dots
        return host == pattern


def _entry(route: Route) -> _Entry:
    host = route.host
    dots = 0
    if host is not None and host.startswith("*."):
        host = host[1:]
        dots = host.count(".")
    prefix = route.path_prefix.rstrip("/")
    folded = prefix.lower()
    if route.case_insensitive:
        prefix = folded
    return _Entry(route, host, dots, prefix, prefix + "/", folded, route.case_insensitive)


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        # Exact hosts before wildcards before any host, then longest prefix; ties
        # keep the order of the config.
        def rank(entry: _Entry) -> tuple[int, int]:
            host_rank = 2 if entry.host is None else 1 if entry.host[0] == "." else 0
            return host_rank, -len(entry.prefix)

        self._entries = sorted((_entry(route) for route in routes), key=rank)
        self._folding = any(e.case_insensitive for e in self._entries)

    def match(self, host: str, path: str) -> Route | None:
        """The route for a normalized path as `normalize.routing_path` reads it.

        Raises AmbiguousPath where a case-insensitive route would take a path
        that a more specific case-sensitive route matches in lowercase.
        """
        host = host.lower().rstrip(".")
        folded = path.lower() if self._folding else path
        for index, entry in enumerate(self._entries):
            if not entry.host_matches(host):
                continue
            candidate = folded if entry.case_insensitive else path
            prefix = entry.prefix
            if prefix and candidate != prefix and not candidate.startswith(entry.below):
                continue
            if entry.case_insensitive:
                self._check_unambiguous(index, host, folded)
            return entry.route
        return None

    def _check_unambiguous(self, index: int, host: str, folded: str) -> None:
        for earlier in self._entries[:index]:
            prefix = earlier.folded_prefix
            covered = not prefix or folded == prefix or folded.startswith(prefix + "/")
            if covered and earlier.host_matches(host):
                raise AmbiguousPath(f"{folded!r} matches route {earlier.route.name!r} in lowercase")
