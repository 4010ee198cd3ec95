"""Routes: host (exact or `*.example.com`) and the longest path prefix win."""

from __future__ import annotations

from collections.abc import Sequence

from stockade.proxy.settings import Route


def _host_matches(pattern: str | None, host: str) -> bool:
    if pattern is None:
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and host.count(".") == pattern.count(".")
    return host == pattern


def _prefix_matches(prefix: str, path: str) -> bool:
    if prefix == "/" or path == prefix:
        return True
    return path.startswith(prefix if prefix.endswith("/") else prefix + "/")


class Router:
    def __init__(self, routes: Sequence[Route]) -> None:
        # Exact hosts before wildcards before any host, then longest prefix.
        def rank(route: Route) -> tuple[int, int]:
            host_rank = 2 if route.host is None else 1 if route.host.startswith("*.") else 0
            return host_rank, -len(route.path_prefix)

        self._routes = sorted(routes, key=rank)

    def match(self, host: str, path: str) -> Route | None:
        host = host.lower().rstrip(".")
        for route in self._routes:
            if _host_matches(route.host, host) and _prefix_matches(route.path_prefix, path):
                return route
        return None


def host_without_port(host_header: str) -> str:
    """`example.com:8443` -> `example.com`; `[fd00::1]:80` -> `fd00::1`."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header
