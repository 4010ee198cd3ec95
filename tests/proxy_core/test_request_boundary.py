"""The request boundary through the running gateway, with raw sockets: duplicate
headers, identity headers, path parameters and other paths a backend serves as
another, Host values and absolute-form targets. Each case asserts what the
upstream received."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from boundary_harness import (
    API_KEY,
    RecordingUpstream,
    Running,
    exchange,
    request,
    running_gateway,
    token,
    two_route_config,
)

from stockade.proxy.ratelimit_settings import LimitRule, RateLimitConfig, parse_rate
from stockade.proxy.settings import ProxyConfig
from stockade.targets import parse_target

Scenario = Callable[[Running, RecordingUpstream], Awaitable[None]]


def run_with(tmp_path: Path, scenario: Scenario, **config: Any) -> None:
    async def main() -> None:
        up = RecordingUpstream("up")
        await up.start()
        try:
            async with running_gateway(two_route_config(tmp_path, up, **config)) as gw:
                await scenario(gw, up)
        finally:
            await up.stop()

    asyncio.run(main())


def forged(sub: str = "root") -> str:
    """An unsigned token: what a client would want an upstream to read."""

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{b64({'alg': 'none'})}.{b64({'sub': sub, 'iss': 'x'})}."


def error_of(reply: bytes) -> str:
    return str(json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"])


# -- duplicate headers the gateway decides on ----------------------------------------


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        # the first is verified, the second is what an upstream reading the last would use
        ("/admin", [("Authorization", "Bearer {good}"), ("Authorization", "Bearer {forged}")]),
        ("/admin", [("Authorization", "Bearer {forged}"), ("authorization", "Bearer {good}")]),
        ("/admin", [("X-API-Key", "{key}"), ("X-API-Key", "other")]),
        ("/admin", [("X-API-Key", "{key}"), ("x-api-key", "{key}")]),
        # a header the gateway decides on is checked on every route
        ("/open", [("Authorization", "Bearer a"), ("Authorization", "Bearer b")]),
        ("/open", [("X-Tenant", "a"), ("X-Tenant", "b")]),  # a rate limit's key
    ],
)
def test_a_second_value_of_a_decided_header_is_refused(
    tmp_path: Path, target: str, headers: list[tuple[str, str]]
) -> None:
    values = {"good": token(), "forged": forged(), "key": API_KEY}
    sent = [(k, v.format(**values)) for k, v in headers]
    limit = LimitRule(name="tenant", rate=parse_rate("1000/s"), key="header", field="X-Tenant")

    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        status, reply = await exchange(gw.port, request(target, *sent))
        assert (status, error_of(reply)) == (400, "duplicate_header")
        assert up.seen == []
        # one good value gets through, and it is exactly the one that was sent
        alone = next((h for h in sent if "{forged}" not in dict(headers)[h[0]]), sent[0])
        status, _ = await exchange(gw.port, request(target, alone))
        assert status == 200
        assert up.values(0, alone[0]) == [alone[1]]

    run_with(tmp_path, scenario, rate_limiting=RateLimitConfig(limits=(limit,)))


def test_duplicate_host_and_content_length_are_refused(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        for head in (
            b"GET /x HTTP/1.1\r\nHost: t\r\nHost: admin.internal\r\n\r\n",
            b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nab",
        ):
            status, _ = await exchange(gw.port, head)
            assert status == 400
        assert up.seen == []

    run_with(tmp_path, scenario)


def test_the_upstream_gets_only_the_credential_that_was_verified(tmp_path: Path) -> None:
    good = token()

    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        # an API key verified: a Bearer token beside it was never checked
        status, _ = await exchange(
            gw.port,
            request("/admin", ("X-API-Key", API_KEY), ("Authorization", f"Bearer {forged()}")),
        )
        assert status == 200
        assert up.values(0, "X-API-Key") == [API_KEY]
        assert up.values(0, "Authorization") == []
        assert up.values(0, "X-Consumer-ID") == ["acme"]
        # a JWT verified on a JWT-only route: an API-key header beside it is dropped
        status, _ = await exchange(
            gw.port,
            request("/jwt", ("Authorization", f"Bearer {good}"), ("X-API-Key", "not-checked")),
        )
        assert status == 200
        assert up.values(1, "Authorization") == [f"Bearer {good}"]
        assert up.values(1, "X-API-Key") == []
        assert up.values(1, "X-Consumer-ID") == ["alice"]

    def config(tmp: Path, up: RecordingUpstream) -> ProxyConfig:
        from dataclasses import replace

        from stockade.proxy.auth_settings import RouteAuth

        base = two_route_config(tmp, up)
        jwt_route = replace(
            base.routes[0],
            name="jwt",
            path_prefix="/jwt",
            auth=RouteAuth(mode="jwt", headers_set=("X-Consumer-ID",)),
        )
        return replace(base, routes=(*base.routes, jwt_route))

    async def main() -> None:
        up = RecordingUpstream("up")
        await up.start()
        try:
            async with running_gateway(config(tmp_path, up)) as gw:
                await scenario(gw, up)
        finally:
            await up.stop()

    asyncio.run(main())


# -- identity headers ------------------------------------------------------------------


def test_identity_headers_are_stripped_on_every_route(tmp_path: Path) -> None:
    spoofed = [
        ("X-Auth-Sub", "admin"),  # set only by the admin route's forward_claims
        ("x-auth-sub", "admin"),
        ("X-Consumer-ID", "admin"),
    ]

    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        status, _ = await exchange(gw.port, request("/open/x", *spoofed))
        assert status == 200
        status, _ = await exchange(gw.port, request("/admin", ("X-API-Key", API_KEY), *spoofed))
        assert status == 200
        for index in (0, 1):
            assert up.values(index, "X-Auth-Sub") == []  # an API key sets no sub claim
        assert up.values(0, "X-Consumer-ID") == []
        assert up.values(1, "X-Consumer-ID") == ["acme"]

    run_with(tmp_path, scenario)


def test_x_forwarded_for_lines_from_a_trusted_proxy_are_one_list(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        status, _ = await exchange(
            gw.port,
            request("/x", ("X-Forwarded-For", "203.0.113.9"), ("X-Forwarded-For", "198.51.100.7")),
        )
        assert status == 200
        assert up.values(0, "X-Forwarded-For") == ["203.0.113.9, 198.51.100.7, 127.0.0.1"]
        # the rightmost address that is not a trusted proxy is the client
        assert gw.decided[0].client_ip == "198.51.100.7"

    run_with(tmp_path, scenario, trusted_proxies=(parse_target("127.0.0.0/8"),))


# -- paths a backend serves as another ----------------------------------------------------

# Tomcat, Jetty and Spring serve each of these as /admin (or below it); IIS drops trailing
# dots and spaces; Spring trims whitespace; a server that decodes twice reads %252e as ".".
BYPASSES = [
    "/admin;x=1",
    "/admin;",
    "/admin;/",
    "/;/admin",
    "/admin;jsessionid=1/x",
    "/x/..;/admin",
    "/admin%3bx",
    "/admin.",
    "/admin./",
    "/admin..",
    "/admin%20",
    "/admin%09",
    "/admin%0b",
    "/admin%0c",
    "/admin%c2%a0",
    "/%20admin",
    "/x/%252e%252e/admin",
    "/%2561dmin",
    "/x/%2e%2e/admin",
    "/x\\..\\admin",
    "/x%2f..%2fadmin",
    "/%ef%bd%81dmin",  # fullwidth a
    "/x/%ef%bc%8f..%ef%bc%8fadmin",  # fullwidth solidus
    "/x/%e2%80%a5/admin",  # two dot leader
]


@pytest.mark.parametrize("target", BYPASSES)
def test_a_path_a_backend_serves_as_the_protected_one_is_refused(
    tmp_path: Path, target: str
) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        status, reply = await exchange(gw.port, request(target))
        assert status == 400, reply[:300]
        assert up.seen == []

    run_with(tmp_path, scenario)


def test_the_plain_protected_path_needs_credentials(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        assert (await exchange(gw.port, request("/admin")))[0] == 401
        assert (await exchange(gw.port, request("//admin/")))[0] == 401
        assert (await exchange(gw.port, request("/x/../admin")))[0] == 401
        assert (await exchange(gw.port, request("/%61dmin")))[0] == 401
        assert (await exchange(gw.port, request("/administrator")))[0] == 200
        assert [s["target"] for s in up.seen] == ["/administrator"]

    run_with(tmp_path, scenario)


def test_path_parameters_where_the_open_route_allows_them(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        # matched without its parameters: /admin, which does not allow them
        assert (await exchange(gw.port, request("/admin;x=1")))[0] == 400
        assert (await exchange(gw.port, request("/;/admin")))[0] == 400
        assert (await exchange(gw.port, request("/admin;jsessionid=1/x")))[0] == 400
        status, _ = await exchange(gw.port, request("/shop;jsessionid=1/cart?q=1"))
        assert status == 200
        assert [s["target"] for s in up.seen] == ["/shop;jsessionid=1/cart?q=1"]

    run_with(tmp_path, scenario, open_route={"allow_path_params": True})


def test_path_parameters_where_both_routes_allow_them(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        for target in ("/admin;x=1", "/admin;", "/;/admin", "/admin;jsessionid=1/x"):
            status, _ = await exchange(gw.port, request(target))
            assert status == 401, target  # the protected route, asking for credentials
        status, _ = await exchange(gw.port, request("/admin;v=2/x", ("X-API-Key", API_KEY)))
        assert status == 200
        assert [s["target"] for s in up.seen] == ["/admin;v=2/x"]  # kept for the backend
        assert gw.decided[-1].route is not None and gw.decided[-1].route.name == "admin"

    params = {"allow_path_params": True}
    run_with(tmp_path, scenario, admin=params, open_route=params)


def test_encoded_slashes_are_separators_for_routing(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        # nginx and IIS read %2F and backslashes as separators: these are /admin to them
        for target in ("/admin%2Fx", "/x%2F..%2Fadmin", "/x\\..\\admin", "/admin%20%2Fx"):
            status, _ = await exchange(gw.port, request(target))
            assert status == 400, target
        status, _ = await exchange(gw.port, request("/files/a%2fb"))
        assert status == 200
        assert [s["target"] for s in up.seen] == ["/files/a%2Fb"]  # kept encoded

    run_with(tmp_path, scenario, open_route={"allow_encoded_slash": True})


def test_a_case_insensitive_route_catches_every_case(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        for target in ("/ADMIN", "/Admin/x", "/aDmIn/", "/%41DMIN"):
            status, _ = await exchange(gw.port, request(target))
            assert status == 401, target
        assert up.seen == []

    run_with(tmp_path, scenario, admin={"case_insensitive": True})


def test_a_case_folding_catch_all_never_serves_a_protected_path(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        status, reply = await exchange(gw.port, request("/ADMIN"))
        assert (status, error_of(reply)) == (400, "ambiguous_case")
        assert (await exchange(gw.port, request("/Admin/users")))[0] == 400
        assert (await exchange(gw.port, request("/admin")))[0] == 401
        assert (await exchange(gw.port, request("/Other")))[0] == 200
        assert [s["target"] for s in up.seen] == ["/Other"]

    run_with(tmp_path, scenario, open_route={"case_insensitive": True})


# -- Host and absolute-form targets ------------------------------------------------------

BAD_HOSTS = [
    "a b",
    "user@evil.example",
    "evil.example@t",
    "fd00::1",
    "fd00::1:8080",
    "[fd00::1",
    "[fd00::1]x",
    "[fd00::zz]",
    "[fe80::1%25eth0]",
    "t:99999",
    "t:",
    "t:8a",
    ":80",
    "",
    "ex%61mple.test",
    "a,b",
    "t/x",
    "t\\x",
    "a" * 64 + ".test",
]


@pytest.mark.parametrize("host", BAD_HOSTS)
def test_an_invalid_host_is_refused(tmp_path: Path, host: str) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        status, _ = await exchange(gw.port, request("/x", host=host))
        assert status == 400, host
        assert up.seen == []

    run_with(tmp_path, scenario)


@pytest.mark.parametrize(
    ("host", "routed"),
    [
        ("t", "t"),
        ("API.Example.test.", "api.example.test"),
        ("t:8080", "t"),
        ("198.18.0.1:80", "198.18.0.1"),
        ("[fd00::1]:8080", "fd00::1"),
        ("[FD00:0::1]", "fd00::1"),
        ("under_score.internal", "under_score.internal"),
    ],
)
def test_a_valid_host_reaches_the_upstream_as_sent(tmp_path: Path, host: str, routed: str) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        status, _ = await exchange(gw.port, request("/x", host=host))
        assert status == 200
        assert up.values(0, "Host") == [host]
        assert up.values(0, "X-Forwarded-Host") == [host]
        assert gw.decided[0].host == routed

    run_with(tmp_path, scenario)


def test_http11_without_host_is_refused_and_http10_gets_an_empty_one(tmp_path: Path) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        assert (await exchange(gw.port, request("/x", host=None)))[0] == 400
        status, _ = await exchange(
            gw.port, b"GET /x HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n"
        )
        assert status == 200
        assert up.values(0, "Host") == [""]  # RFC 9112 3.2: no authority, empty Host
        assert up.values(0, "X-Forwarded-Host") == []

    run_with(tmp_path, scenario)


def test_absolute_form_is_routed_by_its_authority(tmp_path: Path) -> None:
    async def main() -> None:
        from dataclasses import replace

        from stockade.proxy.settings import HealthCheck, Pool, Route, Server

        ups = [RecordingUpstream("a"), RecordingUpstream("b")]
        for up in ups:
            await up.start()
        try:
            base = two_route_config(tmp_path, ups[1])
            pool_a = Pool(
                "a", servers=(Server("127.0.0.1", ups[0].port),), health=HealthCheck(enabled=False)
            )
            api = Route(name="api", pool="a", host="api.example.test")
            config = replace(base, pools=(*base.pools, pool_a), routes=(*base.routes, api))
            async with running_gateway(config) as gw:
                head = request("HTTP://API.example.test:8080/v1/../x?q=1", host="other.test")
                assert (await exchange(gw.port, head))[0] == 200
                head = request("http://other.test/y", host="api.example.test")
                assert (await exchange(gw.port, head))[0] == 200
                head = request("http://api.example.test", host="api.example.test")
                assert (await exchange(gw.port, head))[0] == 200
                # routed and checked like any other request
                head = request("http://other.test/admin;x=1", host="other.test")
                assert (await exchange(gw.port, head))[0] == 400
                head = request("http://other.test/x/../admin", host="other.test")
                assert (await exchange(gw.port, head))[0] == 401
            a, b = ups
            assert [s["target"] for s in a.seen] == ["/x?q=1", "/"]
            assert a.values(0, "Host") == ["API.example.test:8080"]
            assert a.values(1, "Host") == ["api.example.test"]
            assert [s["target"] for s in b.seen] == ["/y"]
            assert b.values(0, "Host") == ["other.test"]
        finally:
            for up in ups:
                await up.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("target", "reason"),
    [
        ("http://user@t/x", "userinfo"),
        ("http://user:pw@t/x", "userinfo"),
        ("ftp://t/x", "bad_scheme"),
        ("http://t%2e/x", "bad_authority"),
        ("http://t/x#frag", "fragment"),
        ("http://t:/x", "bad_authority"),
        ("http://t!/x", "bad_authority"),
        # refused by the HTTP parser already
        ("http://fd00::1/x", None),
        ("http://t:99999/x", None),
        ("http:///x", None),
        ("t:443", None),
        ("*", None),
    ],
)
def test_a_bad_absolute_form_is_refused(tmp_path: Path, target: str, reason: str | None) -> None:
    async def scenario(gw: Running, up: RecordingUpstream) -> None:
        status, reply = await exchange(gw.port, request(target))
        assert status == 400
        if reason is not None:
            assert error_of(reply) == reason
        assert up.seen == []

    run_with(tmp_path, scenario)
