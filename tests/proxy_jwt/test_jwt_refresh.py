"""The periodic JWKS refresh: withdrawn keys stop verifying (and their cached tokens are
dropped), Cache-Control max-age within bounds, failures that keep the keys, are counted and
logged without flooding, and a refresh task that never holds up the loop or the shutdown.

Most tests move a fake clock and call refresh_due() (what the refresh task does on each
tick); the task itself is tested on the system clock with short intervals."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jwt_issuer import JwksServer, inhouse, issuer_env, mint, public_jwk
from multidict import CIMultiDict
from piecewise_http import PiecewiseServer, Reply

from stockade.clock import FakeClock, SystemClock
from stockade.proxy import jwt_auth
from stockade.proxy.jwt_auth import JwtError, JwtVerifier


def run(coro: Coroutine[Any, Any, None]) -> None:
    asyncio.run(coro)


async def reason(verifier: JwtVerifier, token: str) -> str:
    with pytest.raises(JwtError) as info:
        await verifier.verify(token)
    return info.value.reason


def count_signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    original = JwtVerifier._decode

    def counting(self: JwtVerifier, *args: Any) -> dict[str, Any]:
        calls.append(args)
        return original(self, *args)

    monkeypatch.setattr(JwtVerifier, "_decode", counting)
    return calls


OLD_AND_NEW = [public_jwk("rsa", "old"), public_jwk("rsa-new", "new")]


def test_a_withdrawn_key_stops_verifying_without_an_unknown_kid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No token with an unknown kid comes along: the periodic refresh alone retires the
    key, and the tokens it verified are dropped from the cache."""
    calls = count_signature_checks(monkeypatch)

    async def scenario() -> None:
        async with issuer_env(keys=list(OLD_AND_NEW)) as (verifier, server, clock):
            exp = int(clock.wall()) + 3600
            old = mint(clock, kid="old", exp=exp)
            new = mint(clock, kid="new", kind="rsa-new", exp=exp)
            hs = mint(clock, "HS256", exp=exp)
            for token in (old, new, hs):
                await verifier.verify(token)
            server.keys = [public_jwk("rsa-new", "new")]  # the IdP withdraws "old"
            clock.advance(599)
            await verifier.refresh_due()
            assert server.fetches == 1  # jwks_max_age (10 min) not reached
            await verifier.verify(old)  # still trusted, from the cache
            clock.advance(1)
            await verifier.refresh_due()
            assert server.fetches == 2
            before = len(calls)
            assert await reason(verifier, old) == "unknown_kid"
            await verifier.verify(new)  # still cached: its key is still published
            await verifier.verify(hs)  # the secret is not in the JWKS
            assert len(calls) == before  # the old one finds no key; the others: cached
            assert server.fetches == 2  # the old kid is unknown now; rate limited

    run(scenario())


def test_a_failed_refresh_keeps_the_keys_and_retries_after_the_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with issuer_env(keys=list(OLD_AND_NEW)) as (verifier, server, clock):
            server.down = True
            clock.advance(600)
            await verifier.refresh_due()
            assert server.fetches == 2
            assert verifier.fetch_failures["inhouse"] == 1
            await verifier.verify(mint(clock, kid="old"))  # known keys stay
            clock.advance(299)
            await verifier.refresh_due()
            assert server.fetches == 2
            clock.advance(1)  # jwks_refresh_interval after the failure, not jwks_max_age
            await verifier.refresh_due()
            assert server.fetches == 3 and verifier.fetch_failures["inhouse"] == 2
            server.down = False
            server.keys = [public_jwk("rsa-new", "new")]
            clock.advance(300)
            await verifier.refresh_due()
            assert await reason(verifier, mint(clock, kid="old")) == "unknown_kid"
            assert "JWKS fetch for issuer inhouse failed" in caplog.text

    with caplog.at_level(logging.INFO, logger="stockade.proxy.jwt"):
        run(scenario())


def test_fetch_failures_are_logged_once_a_minute_and_all_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        config = inhouse("JWKS", jwks_refresh_interval=1.0, jwks_max_age=1.0)
        async with issuer_env(config, down=True) as (verifier, server, clock):
            for _ in range(40):  # one failure every 2 s for 80 s
                clock.advance(2)
                await verifier.refresh_due()
            assert server.fetches == 41
            assert verifier.fetch_failures["inhouse"] == 41

    with caplog.at_level(logging.DEBUG, logger="stockade.proxy.jwt"):
        run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2, warnings  # at start, and 60 s later
    assert "29 more failures since the last warning" in warnings[1]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG and "again" in r.msg]
    assert len(debug) == 39


# --- Cache-Control --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({}, 600),  # jwks_max_age
        ({"Cache-Control": "public, max-age=400"}, 400),
        ({"Cache-Control": "max-age=10"}, 300),  # never under jwks_refresh_interval
        ({"Cache-Control": "max-age=100000"}, 600),  # never over jwks_max_age
        ({"Cache-Control": 'max-age="450"'}, 450),
        ({"Cache-Control": "max-age=500", "Age": "150"}, 350),
        ({"Cache-Control": "max-age=500", "Age": "x"}, 300),  # stale: RFC 9111 4.2.1
        ({"Cache-Control": "no-store"}, 300),
        ({"Cache-Control": "max-age=500, no-cache"}, 300),
        ({"Cache-Control": "max-age=500, max-age=400"}, 300),
        ({"Cache-Control": "max-age=-5"}, 300),
        ({"Cache-Control": "max-age=99999999999999999999999"}, 600),
        ({"Cache-Control": "private"}, 600),
    ],
)
def test_cache_control_max_age_within_the_bounds(headers: dict[str, str], delay: int) -> None:
    async def scenario() -> None:
        async with issuer_env() as (verifier, server, clock):
            server.headers = headers
            clock.advance(600)
            await verifier.refresh_due()  # the answer with these headers
            assert server.fetches == 2
            clock.advance(delay - 1)
            await verifier.refresh_due()
            assert server.fetches == 2, "too soon"
            clock.advance(1)
            await verifier.refresh_due()
            assert server.fetches == 3, "too late"

    run(scenario())


DIRECTIVES = st.sampled_from(
    ["public", "private", "no-transform", "must-revalidate", "no-store", "no-cache", "s-maxage=5"]
)


@given(
    max_ages=st.lists(st.one_of(st.integers(0, 10**12).map(str), st.text(max_size=4)), max_size=2),
    others=st.lists(DIRECTIVES, max_size=3),
    age=st.one_of(st.none(), st.integers(0, 10**6).map(str), st.text(max_size=3)),
    interval=st.floats(0, 1000),
    extra=st.floats(0, 1000),
)
def test_refresh_delay_is_always_within_the_bounds(
    max_ages: list[str], others: list[str], age: str | None, interval: float, extra: float
) -> None:
    directives = [*(f"max-age={m}" for m in max_ages), *others]
    headers: CIMultiDict[str] = CIMultiDict()
    if directives:
        headers.add("Cache-Control", ", ".join(directives))
    if age is not None:
        headers.add("Age", age)
    config = inhouse(
        "http://127.0.0.1:9/", jwks_refresh_interval=interval, jwks_max_age=interval + extra
    )
    lifetime = jwt_auth.cache_lifetime(headers)
    delay = jwt_auth.refresh_delay(config, lifetime)
    assert interval <= delay <= interval + extra
    if lifetime is not None:
        assert lifetime >= 0
    if not max_ages:
        assert lifetime is None or (lifetime == 0 and {"no-store", "no-cache"} & set(others))
    single_valid = len(max_ages) == 1 and max_ages[0].isascii() and max_ages[0].isdigit()
    if single_valid and not {"no-store", "no-cache"} & set(others) and age is None:
        assert lifetime == min(int(max_ages[0]), 2**31)


# --- the refresh task ---------------------------------------------------------------


def test_the_refresh_task_runs_by_itself_and_retires_keys() -> None:
    """On the system clock with short intervals: the task fetches again and again, and a
    withdrawn key stops verifying within about one jwks_max_age."""

    async def scenario() -> None:
        server = JwksServer(keys=list(OLD_AND_NEW))
        await server.start()
        config = inhouse(server.url, jwks_refresh_interval=0.05, jwks_max_age=0.1)
        verifier = JwtVerifier([config], SystemClock())
        clock = FakeClock(wall=time.time())
        try:
            await verifier.start()
            old = mint(clock, kid="old")
            await verifier.verify(old)
            server.keys = [public_jwk("rsa-new", "new")]
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                try:
                    await verifier.verify(old)
                except JwtError as exc:
                    assert exc.reason == "unknown_kid"
                    break
            else:
                pytest.fail("the withdrawn key still verifies after 5 s")
            fetches = server.fetches
            await asyncio.sleep(0.5)
            assert server.fetches >= fetches + 2  # it keeps going
        finally:
            await verifier.close()
            await server.stop()
        assert verifier._refresh_task is None
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []

    run(scenario())


def test_close_does_not_wait_for_a_fetch_that_hangs() -> None:
    """A JWKS server that stops mid-body (jwks_timeout is long): close() cancels the fetch
    at once instead of waiting out the timeout."""

    async def scenario() -> None:
        server = PiecewiseServer({"/jwks": Reply.json({"keys": [public_jwk("p256", "a")]})})
        await server.start()
        config = inhouse(
            server.url("/jwks"), jwks_refresh_interval=0.05, jwks_max_age=0.1, jwks_timeout=60.0
        )
        verifier = JwtVerifier([config], SystemClock())
        try:
            await verifier.start()
            server.stall_after = 100  # the next answers hang after 100 bytes
            deadline = time.monotonic() + 5
            while server.hits["/jwks"] < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert server.hits["/jwks"] >= 2
            began = time.monotonic()
            await verifier.close()
            assert time.monotonic() - began < 1.0
        finally:
            await verifier.close()
            await server.stop()

    run(scenario())


def test_the_jwks_is_parsed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []
    original = jwt_auth._usable_keys

    def recording(body: bytes) -> Any:
        threads.append(threading.current_thread())
        return original(body)

    monkeypatch.setattr(jwt_auth, "_usable_keys", recording)

    async def scenario() -> None:
        async with issuer_env() as (verifier, _, clock):
            await verifier.verify(mint(clock))

    run(scenario())
    assert threads and threading.main_thread() not in threads


def test_a_jwks_entry_of_the_wrong_json_type_is_skipped_not_fatal() -> None:
    """An "alg" that is a list once raised TypeError out of the fetch (the start failed)."""

    async def scenario() -> None:
        keys = [
            {**public_jwk("p256", "x"), "alg": ["ES256"]},
            {**public_jwk("p256", "y"), "kid": 7},
            {**public_jwk("rsa", "z"), "n": 5},
            public_jwk("rsa", "k1"),
        ]
        async with issuer_env(keys=keys) as (verifier, _, clock):
            await verifier.verify(mint(clock))
            assert verifier.fetch_failures.total() == 0

    run(scenario())
