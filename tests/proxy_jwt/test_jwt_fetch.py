"""Fetching the issuer's keys: JWKS bodies that arrive in pieces (chunked, many TCP segments,
many TLS records), OpenID discovery, the CA file, redirects, size and time limits."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from hypothesis import given
from hypothesis import strategies as st
from jwt_issuer import ASYMMETRIC, AUD, mint, public_jwk
from piecewise_http import DISCOVERY, LARGE, SMALL, PiecewiseServer, Reply, ca_file, server_tls

from stockade.clock import FakeClock
from stockade.proxy import auth_settings, jwt_auth
from stockade.proxy.jwt_auth import JWKS_MAX_BYTES, IssuerConfig, JwtError, JwtVerifier


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def reason(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(JwtError) as info:
        await verifier.verify(token)
    return info.value.reason


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def config(
    jwks_url: str | None, issuer: str = "https://idp.example.test/", **fields: Any
) -> IssuerConfig:
    values: dict[str, Any] = {
        "name": "idp",
        "issuer": issuer,
        "audience": (AUD,),
        "algorithms": ASYMMETRIC,
        "jwks_url": jwks_url,
        "jwks_timeout": 20.0,  # the pieces take a while; the limit is tested on its own
    }
    values.update(fields)
    return IssuerConfig(**values)


@asynccontextmanager
async def started(
    issuer: IssuerConfig, clock: FakeClock | None = None, **args: Any
) -> AsyncIterator[JwtVerifier]:
    args.setdefault("background_refresh", False)
    verifier = JwtVerifier([issuer], clock or FakeClock(), **args)
    try:
        await verifier.start()
        yield verifier
    finally:
        await verifier.close()


def token_for(jwks: dict[str, Any], clock: FakeClock, **claims: Any) -> str:
    if jwks is SMALL:
        return mint(clock, "EdDSA", kid="pieces", kind="ed25519-pieces", **claims)
    return mint(clock, "RS256", kid="pieces", kind="rsa-pieces", **claims)


# --- a JWKS in pieces -------------------------------------------------------------------


PIECES = [
    ("chunked, 1-byte writes", True, 1, SMALL, False),
    ("chunked, 7-byte writes", True, 7, LARGE, False),
    ("content-length, 7-byte writes", False, 7, LARGE, False),
    ("TLS, chunked, 7-byte writes", True, 7, LARGE, True),
    ("TLS, content-length, 1-byte writes", False, 1, SMALL, True),
]


@pytest.mark.parametrize(
    ("name", "chunked", "piece", "jwks", "tls"), PIECES, ids=[p[0] for p in PIECES]
)
def test_jwks_sent_in_pieces_is_read_whole(
    ca: trustme.CA,
    tmp_path: Path,
    name: str,
    chunked: bool,
    piece: int,
    jwks: dict[str, Any],
    tls: bool,
) -> None:
    """The key is only in the last bytes of the body: a read that returns what has arrived
    so far gets a prefix, which does not parse (every token jwks_unavailable)."""

    async def scenario() -> None:
        server = PiecewiseServer(
            {"/jwks": Reply.json(jwks)},
            piece=piece,
            chunked=chunked,
            tls=server_tls(ca) if tls else None,
        )
        await server.start()
        try:
            fields: dict[str, Any] = {"ca_file": ca_file(ca, tmp_path)} if tls else {}
            clock = FakeClock()
            async with started(config(server.url("/jwks"), **fields), clock) as verifier:
                claims = await verifier.verify(token_for(jwks, clock))
                assert claims["sub"] == "alice", name
                assert verifier.fetch_failures.total() == 0
            assert server.hits["/jwks"] == 1
        finally:
            await server.stop()

    run(scenario())


def test_new_kid_after_a_rotation_found_in_a_jwks_sent_in_pieces() -> None:
    """After a rotation, a token with the new kid refetches: the new set must be read whole,
    or the new kid stays unknown_kid for good."""

    async def scenario() -> None:
        published = {"keys": [public_jwk("p256", "a")]}
        server = PiecewiseServer({"/jwks": lambda: Reply.json(published)}, piece=7)
        await server.start()
        clock = FakeClock()
        try:
            async with started(config(server.url("/jwks")), clock) as verifier:
                token = token_for(LARGE, clock)
                assert await reason(verifier, token) == "unknown_kid"
                published = LARGE
                clock.advance(301)  # the unknown-kid refetch is rate limited
                assert (await verifier.verify(token))["sub"] == "alice"
                assert server.hits["/jwks"] == 2
        finally:
            await server.stop()

    run(scenario())


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "content-length"])
def test_jwks_size_limit_is_exact(chunked: bool) -> None:
    """A body of exactly JWKS_MAX_BYTES is read; one byte more is refused (whether the
    length is declared or only seen while reading)."""

    def padded(size: int) -> bytes:
        body = json.dumps({"keys": LARGE["keys"], "pad": ""}).encode()
        return body.replace(b'"pad": ""', b'"pad": "' + b"x" * (size - len(body)) + b'"')

    async def scenario() -> None:
        body = padded(JWKS_MAX_BYTES)
        server = PiecewiseServer(
            {"/jwks": lambda: Reply(200, body)},
            piece=1 << 16,
            pause=0,
            chunked=chunked,
            chunk_size=1 << 15,
        )
        await server.start()
        clock = FakeClock()
        try:
            assert len(padded(JWKS_MAX_BYTES)) == JWKS_MAX_BYTES
            async with started(config(server.url("/jwks")), clock) as verifier:
                await verifier.verify(token_for(LARGE, clock))
            body = padded(JWKS_MAX_BYTES + 1)
            async with started(config(server.url("/jwks")), clock) as verifier:
                assert await reason(verifier, token_for(LARGE, clock)) == "jwks_unavailable"
                assert verifier.fetch_failures["idp"] == 1
        finally:
            await server.stop()

    run(scenario())


def test_a_jwks_that_stops_mid_body_fails_within_the_timeout() -> None:
    async def scenario() -> None:
        server = PiecewiseServer({"/jwks": Reply.json(LARGE)}, piece=7, stall_after=200)
        await server.start()
        clock = FakeClock()
        try:
            began = time.monotonic()
            issuer = config(server.url("/jwks"), jwks_timeout=0.5)
            async with started(issuer, clock) as verifier:
                assert time.monotonic() - began < 5
                assert await reason(verifier, token_for(LARGE, clock)) == "jwks_unavailable"
                assert verifier.fetch_failures["idp"] == 1
        finally:
            await server.stop()

    run(scenario())


class Trickle:
    """A StreamReader whose read(n) returns what has "arrived": at most n bytes, in the
    sizes given, then b"" at the end. It checks that no read asks for more than one byte
    past `limit` in all."""

    def __init__(self, data: bytes, sizes: list[int], limit: int) -> None:
        self.data, self.sizes, self.limit, self.returned = data, sizes, limit, 0

    async def read(self, n: int) -> bytes:
        assert n >= 1 and self.returned + n <= self.limit + 1
        size = min(n, self.sizes.pop(0) if self.sizes else n)
        part, self.data = self.data[:size], self.data[size:]
        self.returned += len(part)
        return part


@given(
    data=st.binary(max_size=300),
    sizes=st.lists(st.integers(1, 40), max_size=60),
    limit=st.integers(0, 320),
)
def test_read_body_reads_everything_up_to_the_limit(
    data: bytes, sizes: list[int], limit: int
) -> None:
    """Whatever the pieces: the whole body when it fits, ValueError when it does not."""
    stream = Trickle(data, sizes, limit)

    async def read() -> bytes:
        return await jwt_auth.read_body(stream, limit)  # type: ignore[arg-type]

    if len(data) <= limit:
        assert asyncio.run(read()) == data
    else:
        with pytest.raises(ValueError, match="over"):
            asyncio.run(read())


# --- TLS: the CA file, and nothing else ----------------------------------------------


def test_tls_jwks_needs_a_trusted_certificate(ca: trustme.CA, tmp_path: Path) -> None:
    async def scenario() -> None:
        server = PiecewiseServer({"/jwks": Reply.json(LARGE)}, tls=server_tls(ca))
        await server.start()
        clock = FakeClock()
        other = tmp_path / "other"
        other.mkdir()
        try:
            # the system CAs do not know the test CA; nor does another CA's file
            untrusted: list[dict[str, Any]] = [{}, {"ca_file": ca_file(trustme.CA(), other)}]
            for fields in untrusted:
                async with started(config(server.url("/jwks"), **fields), clock) as verifier:
                    assert await reason(verifier, token_for(LARGE, clock)) == "jwks_unavailable"
                    assert verifier.fetch_failures["idp"] == 1
            async with started(config(server.url("/jwks"), ca_file=ca_file(ca, tmp_path))) as v:
                await v.verify(token_for(LARGE, clock))
        finally:
            await server.stop()

    run(scenario())


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "No such file"), (b"", "no certificate"), (b"not a certificate\n", "certificate")],
)
def test_bad_ca_file_stops_the_start_naming_the_file(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "broken-ca.pem"
    if content is not None:
        path.write_bytes(content)

    async def scenario() -> None:
        verifier = JwtVerifier([config("https://127.0.0.1:9/jwks", ca_file=path)])
        try:
            with pytest.raises(ValueError, match=message) as info:
                await verifier.start()
            assert str(path) in str(info.value)
        finally:
            await verifier.close()

    run(scenario())


def test_redirects_are_not_followed() -> None:
    async def scenario() -> None:
        server = PiecewiseServer(
            {"/moved": Reply(302, b"", [("Location", "/jwks")]), "/jwks": Reply.json(LARGE)}
        )
        await server.start()
        clock = FakeClock()
        try:
            async with started(config(server.url("/moved")), clock) as verifier:
                assert await reason(verifier, token_for(LARGE, clock)) == "jwks_unavailable"
            assert server.hits["/jwks"] == 0
        finally:
            await server.stop()

    run(scenario())


# --- OpenID discovery -------------------------------------------------------------------


def provider(server: PiecewiseServer, **changes: Any) -> dict[str, Any]:
    document = {
        "issuer": server.base + "/",
        "jwks_uri": server.url("/keys"),
        "authorization_endpoint": server.url("/authorize"),
        "id_token_signing_alg_values_supported": ["RS256"],
    }
    document.update(changes)
    return {k: v for k, v in document.items() if v is not None}


def test_discovery_over_tls_in_pieces(ca: trustme.CA, tmp_path: Path) -> None:
    async def scenario() -> None:
        server = PiecewiseServer(piece=7, tls=server_tls(ca))
        await server.start()
        server.routes = {DISCOVERY: Reply.json(provider(server)), "/keys": Reply.json(LARGE)}
        issuer = server.base + "/"
        clock = FakeClock()
        try:
            fields = {"ca_file": ca_file(ca, tmp_path)}
            async with started(config(None, issuer, **fields), clock) as verifier:
                claims = await verifier.verify(token_for(LARGE, clock, iss=issuer))
                assert claims["iss"] == issuer
            assert server.hits == {DISCOVERY: 1, "/keys": 1}
        finally:
            await server.stop()

    run(scenario())


def test_discovery_url_drops_one_trailing_slash() -> None:
    url = auth_settings.discovery_url
    assert url("https://idp.test") == "https://idp.test" + DISCOVERY
    assert url("https://idp.test/") == "https://idp.test" + DISCOVERY
    assert url("https://idp.test/tenant/") == "https://idp.test/tenant" + DISCOVERY
    for bad in (
        "idp",
        "ftp://idp.test/",
        "https://idp.test/?x=1",
        "https://idp.test/#f",
        "https://user@idp.test/",
        "https:///path",
        "https://idp.test:99999/",
        "https://idp .test/",
    ):
        assert url(bad) is None, bad


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"issuer": "ISSUER-WITHOUT-SLASH"}, "is for issuer"),  # exact match, not "close"
        ({"issuer": "https://evil.test/"}, "is for issuer"),
        ({"issuer": None}, "is for issuer"),
        ({"jwks_uri": None}, "no jwks_uri"),
        ({"jwks_uri": 5}, "no jwks_uri"),
        ({"jwks_uri": "/keys"}, "not an absolute"),
        ({"jwks_uri": "HTTP-KEYS"}, "not https"),
    ],
)
def test_discovery_that_does_not_match_is_refused(
    ca: trustme.CA,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    changes: dict[str, Any],
    why: str,
) -> None:
    """OpenID Connect Discovery 4.3: the document's issuer is exactly the configured one;
    an https issuer's JWKS is not fetched over http."""

    async def scenario() -> None:
        server = PiecewiseServer(tls=server_tls(ca))
        plain = PiecewiseServer({"/keys": Reply.json(LARGE)})
        await server.start()
        await plain.start()
        if changes.get("issuer") == "ISSUER-WITHOUT-SLASH":
            changes["issuer"] = server.base
        if changes.get("jwks_uri") == "HTTP-KEYS":
            changes["jwks_uri"] = plain.url("/keys")
        server.routes = {DISCOVERY: Reply.json(provider(server, **changes))}
        server.routes["/keys"] = Reply.json(LARGE)
        issuer = server.base + "/"
        clock = FakeClock()
        try:
            fields = {"ca_file": ca_file(ca, tmp_path)}
            async with started(config(None, issuer, **fields), clock) as verifier:
                token = token_for(LARGE, clock, iss=issuer)
                assert await reason(verifier, token) == "jwks_unavailable"
                assert verifier.fetch_failures["idp"] == 1
            assert server.hits["/keys"] == 0 and plain.hits["/keys"] == 0
            assert why in caplog.text
        finally:
            await server.stop()
            await plain.stop()

    with caplog.at_level(logging.WARNING, logger="stockade.proxy.jwt"):
        run(scenario())


def test_an_http_issuer_may_use_an_http_jwks_uri() -> None:
    """The policy of jwks_url: http is the operator's choice (a lab); only an https issuer
    pins its JWKS to https."""

    async def scenario() -> None:
        server = PiecewiseServer()
        await server.start()
        server.routes = {DISCOVERY: Reply.json(provider(server)), "/keys": Reply.json(LARGE)}
        clock = FakeClock()
        try:
            async with started(config(None, server.base + "/"), clock) as verifier:
                await verifier.verify(token_for(LARGE, clock, iss=server.base + "/"))
        finally:
            await server.stop()

    run(scenario())


def test_discovery_down_at_start_is_retried_and_a_failing_jwks_uri_rediscovered() -> None:
    async def scenario() -> None:
        server = PiecewiseServer()
        await server.start()
        state = {"discovery": Reply(503, b"down"), "keys": Reply(503, b"down")}
        server.routes = {DISCOVERY: lambda: state["discovery"], "/keys": lambda: state["keys"]}
        issuer = server.base + "/"
        clock = FakeClock()
        try:
            async with started(config(None, issuer), clock) as verifier:
                token = token_for(LARGE, clock, iss=issuer, exp=int(clock.wall()) + 3600)
                assert await reason(verifier, token) == "jwks_unavailable"
                assert server.hits == {DISCOVERY: 1}
                state["discovery"] = Reply.json(provider(server))
                clock.advance(300)  # retried after jwks_refresh_interval
                await verifier.refresh_due()
                # discovered, but the JWKS itself failed: the next try looks it up again
                assert server.hits == {DISCOVERY: 2, "/keys": 1}
                assert await reason(verifier, token) == "jwks_unavailable"
                state["keys"] = Reply.json(LARGE)
                clock.advance(300)
                await verifier.refresh_due()
                assert server.hits == {DISCOVERY: 3, "/keys": 2}
                await verifier.verify(token)
                assert verifier.fetch_failures["idp"] == 2
                clock.advance(600)  # a good JWKS: its URL is kept, not discovered again
                await verifier.refresh_due()
                assert server.hits == {DISCOVERY: 3, "/keys": 3}
        finally:
            await server.stop()

    run(scenario())
