"""The request boundary's parts on their own: the header sets computed from the
config, Host syntax, the new path rules and the route keys that configure them."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stockade.config import ConfigError, parse_config
from stockade.proxy.anomaly_settings import AnomalyConfig, AnomalyRule
from stockade.proxy.auth_settings import AuthConfig, RouteAuth
from stockade.proxy.headers import gateway_headers, single_valued_headers
from stockade.proxy.normalize import BadPath, normalize_path
from stockade.proxy.ratelimit_settings import LimitRule, RateLimitConfig, parse_rate
from stockade.proxy.routing import parse_authority
from stockade.proxy.settings import ProxyConfig, Route
from stockade.proxy.smuggling import framing_problem
from stockade.proxy.waf_settings import RouteWaf

# -- the headers the gateway decides on, and those it writes ---------------------------


def test_single_valued_headers_come_from_the_whole_config() -> None:
    assert single_valued_headers(ProxyConfig()) == {
        b"host",
        b"content-length",
        b"authorization",
        b"x-api-key",
    }
    config = ProxyConfig(
        auth=AuthConfig(api_key_header="X-Key"),
        rate_limiting=RateLimitConfig(
            limits=(
                LimitRule("tenant", parse_rate("5/s"), key="header", field="X-Tenant"),
                LimitRule("q", parse_rate("5/s"), key="query", field="X-Not-A-Header"),
            )
        ),
        anomaly=AnomalyConfig(rules=(AnomalyRule(name="bots", action="deny", user_agents=True),)),
        routes=(Route(name="r", pool="p", waf=RouteWaf(mode="sqli_xss")),),
    )
    assert single_valued_headers(config) == {
        b"host",
        b"content-length",
        b"authorization",
        b"x-key",
        b"x-tenant",
        b"user-agent",
        b"content-type",
        b"content-encoding",
    }


def test_gateway_headers_are_every_routes_identity_headers() -> None:
    config = ProxyConfig(
        auth=AuthConfig(consumer_header="X-Who"),
        routes=(
            Route(
                name="a",
                pool="p",
                auth=RouteAuth(mode="jwt", forward_claims=(("sub", "X-Auth-Sub"),)),
            ),
            Route(name="b", pool="p", auth=RouteAuth(mode="jwt", headers_set=("X-Tenant-ID",))),
            Route(name="open", pool="p"),
        ),
    )
    assert gateway_headers(config) == {"x-who", "x-auth-sub", "x-tenant-id"}


def lines(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.encode(), v.encode()) for k, v in pairs]


def test_a_duplicate_is_reported_after_any_framing_problem() -> None:
    single = frozenset({b"authorization", b"content-length"})
    dup = lines(("Authorization", "a"), ("AUTHORIZATION", "b"))
    assert framing_problem(dup, single_valued=single) == "duplicate_header"
    assert framing_problem(dup) is None  # only the named headers
    assert framing_problem(lines(("Accept", "a"), ("Accept", "b")), single_valued=single) is None
    both = lines(("Content-Length", "1"), ("Content-Length", "1"), ("Authorization", "a"))
    assert framing_problem(both, single_valued=single) == "duplicate_content_length"
    smuggle = [*dup, *lines(("Transfer-Encoding", "gzip, chunked"))]
    assert framing_problem(smuggle, single_valued=single) == "unsupported_transfer_encoding"


# -- Host ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "host"),
    [
        ("example.com", "example.com"),
        ("Example.COM.", "example.com"),
        ("example.com:8443", "example.com"),
        ("x:0", "x"),
        ("x:65535", "x"),
        ("198.18.0.1", "198.18.0.1"),
        ("[fd00::1]", "fd00::1"),
        ("[FD00:0:0::1]:80", "fd00::1"),
        ("[::ffff:198.18.0.1]", "::ffff:c612:1"),
        ("under_score", "under_score"),
        ("a" * 63 + ".b", "a" * 63 + ".b"),
        # refused
        ("", None),
        (" x", None),
        ("a b", None),
        ("user@x", None),
        ("x:", None),
        ("x:65536", None),
        ("x:123456", None),
        ("x:+1", None),
        ("fd00::1", None),
        ("[fd00::1", None),
        ("[fd00::1]:", None),
        ("[fe80::1%eth0]", None),
        ("[v1.x]", None),
        ("[1.2.3.4]", None),
        ("x..y", None),
        (".x", None),
        ("x%41", None),
        ("x,y", None),
        ("x/", None),
        ("a" * 64, None),
        ("a." * 127 + "b", None),
        ("ex\u0101mple", None),
        ("x\n", None),
    ],
)
def test_parse_authority(value: str, host: str | None) -> None:
    assert parse_authority(value) == host


@given(st.text(max_size=30))
def test_parse_authority_accepts_only_what_it_can_name(value: str) -> None:
    host = parse_authority(value)
    if host is not None:
        assert value.isascii() and " " not in value and "@" not in value
        assert host == host.lower() and not host.endswith(".")
        # idempotent: the routing host is itself a valid authority (IPv6 in brackets)
        assert parse_authority(f"[{host}]" if ":" in host else host) == host


# -- the path rules --------------------------------------------------------------------

PARAMS = {"allow_path_params": True}
STRICT: dict[str, bool] = {}


@pytest.mark.parametrize(
    ("raw", "flags", "expected"),
    [
        ("/admin;x=1", STRICT, "!path_params"),
        ("/admin;x=1", PARAMS, "/admin;x=1"),
        ("/;/admin", PARAMS, "/;/admin"),
        ("/admin;jsessionid=1/x", PARAMS, "/admin;jsessionid=1/x"),
        ("/..;/admin", PARAMS, "!dot_segment_params"),
        ("/admin%3bx", PARAMS, "!encoded_semicolon"),
        ("/admin.;x", PARAMS, "!trailing_dot"),
        ("/admin;x.", PARAMS, "/admin;x."),  # the parameter is dropped by the backend
        ("/admin%20", STRICT, "!edge_whitespace"),
        ("/admin%09/x", STRICT, "!edge_whitespace"),
        ("/%0badmin", STRICT, "!edge_whitespace"),
        ("/admin%7f", STRICT, "!edge_whitespace"),
        ("/admin%e2%80%8b", STRICT, "!edge_whitespace"),  # zero width space
        ("/a%20b", STRICT, "/a%20b"),  # inside a name it is data
        ("/admin.%20", STRICT, "!edge_whitespace"),
        ("/admin%20.", STRICT, "!trailing_dot"),
        ("/admin%20%2fx", {"allow_encoded_slash": True}, "!edge_whitespace"),
        ("/x%5cadmin.%2f", {"allow_encoded_slash": True}, "!trailing_dot"),
        ("/x%2f..%2fadmin", {"allow_encoded_slash": True}, "/x%2F..%2Fadmin"),
        ("/%25", STRICT, "/%25"),
        ("/%25zz", STRICT, "/%25zz"),
        ("/%25%34%31", STRICT, "!double_encoding"),
        ("/%25U002e", STRICT, "!double_encoding"),
        ("/%c2%a0", STRICT, "!lookalike_character"),  # NFKC: a space
        ("/%ef%bd%81dmin", STRICT, "!lookalike_character"),  # fullwidth a
        ("/%ef%bc%8e%ef%bc%8e", STRICT, "!lookalike_character"),  # fullwidth dots
        ("/%e2%84%aa", STRICT, "!lookalike_character"),  # Kelvin sign: k
        ("/adm%c4%b1n", STRICT, "!lookalike_character"),  # dotless i: I
        ("/%c4%b0", STRICT, "!lookalike_character"),  # dotted capital I: i + mark
        ("/%cd%be", STRICT, "!lookalike_character"),  # Greek question mark: ;
        ("/stra%c3%9fe", STRICT, "/stra%C3%9Fe"),  # sharp s folds to "ss", not one letter
        ("/%d0%b0dmin", STRICT, "/%D0%B0dmin"),  # Cyrillic a: no server reads it as "a"
        ("/%e6%9d%b1%e4%ba%ac", STRICT, "/%E6%9D%B1%E4%BA%AC"),
    ],
)
def test_path_rules(raw: str, flags: dict[str, bool], expected: str) -> None:
    if expected.startswith("!"):
        with pytest.raises(BadPath) as info:
            normalize_path(raw, **flags)
        assert info.value.reason == expected[1:]
    else:
        assert normalize_path(raw, **flags) == expected
        assert normalize_path(expected, **flags) == expected


# -- route keys ------------------------------------------------------------------------


def proxy(route: dict[str, Any]) -> dict[str, Any]:
    return {
        "proxy": {
            "pools": {"api": {"servers": ["198.18.1.10:8080"]}},
            "routes": [{"pool": "api", **route}],
        }
    }


def test_route_keys_for_path_parameters_and_case() -> None:
    (route,) = parse_config(proxy({})).proxy.routes
    assert route.allow_path_params is False and route.case_insensitive is False
    (route,) = parse_config(
        proxy({"allow_path_params": True, "case_insensitive": True})
    ).proxy.routes
    assert route.allow_path_params is True and route.case_insensitive is True


@pytest.mark.parametrize(
    "prefix", ["/admin;", "//admin", "/a/../admin", "/admin.", "/adm in", "/caf\u00e9", "/a/./b"]
)
def test_a_prefix_no_normalized_path_can_match_is_refused(prefix: str) -> None:
    with pytest.raises(ConfigError, match="path_prefix"):
        parse_config(proxy({"path_prefix": prefix}))
