"""Routing, forwarding headers and request ids: pure functions, no sockets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from stockade.proxy.context import request_id_from
from stockade.proxy.headers import client_ip, end_to_end, forwarding_headers
from stockade.proxy.routing import Router, host_without_port
from stockade.proxy.settings import Route
from stockade.targets import parse_target

ROUTES = (
    Route(name="any-root", pool="p", path_prefix="/"),
    Route(name="any-api", pool="p", path_prefix="/api"),
    Route(name="exact-api", pool="p", host="api.example.com", path_prefix="/api/"),
    Route(name="exact-root", pool="p", host="api.example.com"),
    Route(name="wild", pool="p", host="*.example.com", path_prefix="/"),
    Route(name="admin", pool="p", host="api.example.com", path_prefix="/api/admin"),
)


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("api.example.com", "/api/admin/users", "admin"),
        ("api.example.com", "/api/admin", "admin"),
        ("api.example.com", "/api/administrator", "exact-api"),  # prefix ends at a segment
        ("api.example.com", "/api/x", "exact-api"),
        ("API.Example.COM.", "/api/x", "exact-api"),
        ("api.example.com", "/other", "exact-root"),
        ("www.example.com", "/api/x", "wild"),
        ("a.b.example.com", "/api/x", "any-api"),  # a wildcard covers one label
        ("example.com", "/api", "any-api"),
        ("example.com", "/apix", "any-root"),
        ("other.test", "/", "any-root"),
    ],
)
def test_router_picks_host_then_longest_prefix(host: str, path: str, expected: str) -> None:
    route = Router(ROUTES).match(host, path)
    assert route is not None and route.name == expected


def test_router_without_a_match() -> None:
    assert Router((Route(name="r", pool="p", host="a.test"),)).match("b.test", "/") is None


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("example.com", "example.com"),
        ("example.com:8443", "example.com"),
        ("[fd00::1]:8443", "fd00::1"),
        ("[fd00::1]", "fd00::1"),
        ("198.18.0.1:80", "198.18.0.1"),
    ],
)
def test_host_without_port(header: str, host: str) -> None:
    assert host_without_port(header) == host


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


def test_hop_by_hop_and_connection_listed_headers_are_dropped() -> None:
    out = end_to_end(
        headers(
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic x"),
            ("Proxy-Connection", "keep-alive"),
            ("X-Secret-Hop", "1"),
            ("Accept", "a"),
            ("Accept", "b"),
            ("Content-Length", "5"),
        )
    )
    assert list(out.items()) == [("Accept", "a"), ("Accept", "b"), ("Content-Length", "5")]


TRUSTED = (parse_target("198.18.5.0/24"), parse_target("fd00:5::/64"))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("198.18.0.10", None, "198.18.0.10"),
        ("198.18.0.10", "203.0.113.9", "198.18.0.10"),  # untrusted peer: not believed
        ("198.18.5.1", "203.0.113.9", "203.0.113.9"),
        ("198.18.5.1", "203.0.113.9, 198.18.5.2", "203.0.113.9"),  # skip trusted hops
        ("198.18.5.1", "1.2.3.4, 203.0.113.9", "203.0.113.9"),  # rightmost untrusted wins
        ("198.18.5.1", "garbage, 203.0.113.9", "203.0.113.9"),
        ("198.18.5.1", "203.0.113.9, garbage", "198.18.5.1"),  # malformed: keep the peer
        ("fd00:5::1", "fd00:18::10", "fd00:18::10"),
    ],
)
def test_client_ip_believes_only_trusted_proxies(peer: str, xff: str | None, expected: str) -> None:
    assert client_ip(peer, xff, TRUSTED) == expected


def test_forwarding_headers_replace_an_untrusted_chain() -> None:
    out: CIMultiDict[str] = CIMultiDict()
    forwarding_headers(
        out,
        peer="198.18.0.10",
        incoming_xff="6.6.6.6",
        peer_trusted=False,
        scheme="https",
        host="api.example.com",
        request_id="abc",
    )
    assert out["X-Forwarded-For"] == "198.18.0.10"
    assert out["X-Forwarded-Proto"] == "https"
    assert out["Forwarded"] == "for=198.18.0.10;proto=https"
    assert out["X-Request-ID"] == "abc"


def test_forwarding_headers_extend_a_trusted_chain_and_quote_ipv6() -> None:
    out: CIMultiDict[str] = CIMultiDict()
    forwarding_headers(
        out,
        peer="fd00:5::1",
        incoming_xff="203.0.113.9",
        peer_trusted=True,
        scheme="http",
        host="h",
        request_id="r",
    )
    assert out["X-Forwarded-For"] == "203.0.113.9, fd00:5::1"
    assert out["Forwarded"] == 'for="[fd00:5::1]";proto=http'


@pytest.mark.parametrize("good", ["abc", "A1-b2_c3.d4:e5", "x" * 128])
def test_request_id_passes_through_when_well_formed(good: str) -> None:
    assert request_id_from(good) == good


@pytest.mark.parametrize("bad", [None, "", "x" * 129, "a b", "a\r\nb", "ä"])
def test_request_id_is_generated_otherwise(bad: str | None) -> None:
    generated = request_id_from(bad)
    assert generated != bad and len(generated) == 32


def test_generated_request_ids_are_unique_and_a_new_process_gets_a_new_prefix() -> None:
    from stockade.proxy import context as ctxmod

    ids = {request_id_from(None) for _ in range(10_000)}
    assert len(ids) == 10_000
    before = request_id_from(None)
    ctxmod.reset_request_ids()
    after = request_id_from(None)
    assert before[:16] != after[:16]
