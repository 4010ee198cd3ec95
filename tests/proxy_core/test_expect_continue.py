"""Expect: 100-continue through the gateway: every check that needs no body runs first, then
100 Continue or the final refusal, without the body having been sent (RFC 9110 10.1.1)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from availability_harness import Backend, access_lines, connected, request_head
from hypothesis import given
from hypothesis import strategies as st
from proxy_harness import gateway

from stockade.proxy.api_keys import generate_key
from stockade.proxy.app import Gateway
from stockade.proxy.auth_settings import AuthConfig, RouteAuth
from stockade.proxy.settings import HealthCheck, Listener, Pool, ProxyConfig, Route, Server
from stockade.proxy.stages.context import expects_continue
from stockade.proxy.waf_settings import RouteWaf

KEY, ENTRY = generate_key("acme", "pro")
RAW_ENTRY = {
    "key_id": ENTRY.key_id,
    "salt": ENTRY.salt.hex(),
    "digest": ENTRY.digest.hex(),
    "consumer": ENTRY.consumer,
    "plan": ENTRY.plan,
}
BODY = b"b" * 300_000


@asynccontextmanager
async def running(tmp_path: Path, **route: object) -> AsyncIterator[tuple[str, Gateway, Backend]]:
    backend = Backend()
    await backend.start()
    pool = Pool(
        name="api",
        servers=(Server("127.0.0.1", backend.port),),
        health=HealthCheck(enabled=False),
    )
    config = ProxyConfig(
        listeners=(Listener("127.0.0.1", 0),),
        routes=(Route(name="api", pool="api", auth=RouteAuth(mode="api_key"), **route),),  # type: ignore[arg-type]
        pools=(pool,),
        workers=1,
        access_log=str(tmp_path / "access.log"),
        auth=AuthConfig(api_keys=(RAW_ENTRY,)),
    )
    try:
        async with gateway(config) as (url, gw):
            yield url, gw, backend
    finally:
        await backend.stop()


def upload_head(*headers: str, length: int = len(BODY), version: str = "1.1") -> bytes:
    head = request_head("POST", "/upload", *headers, length=length)
    return head.replace(b"HTTP/1.1", f"HTTP/{version}".encode(), 1)


def test_an_unauthenticated_upload_is_refused_before_its_body_is_sent(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (url, gw, backend):
            async with connected(url) as raw:
                await raw.send(upload_head("Expect: 100-continue"))
                started = time.monotonic()
                # the client holds its body back; the final answer comes without it
                status, headers, body = await raw.response(timeout=3.0)
                assert time.monotonic() - started < 2.0
                assert status == 401
                assert json.loads(body)["error"] == "missing"
                assert headers["connection"].lower() == "close"
                assert await raw.at_eof()  # nothing more is read from this connection
                assert backend.seen == []
                (line,) = await access_lines(gw, tmp_path / "access.log", 1)
                assert (line["status"], line["bytes_in"]) == (401, 0)

    asyncio.run(scenario())


@pytest.mark.parametrize("value", ["100-continue", "100-Continue", " 100-CONTINUE ,"])
def test_an_accepted_upload_gets_100_then_its_answer(tmp_path: Path, value: str) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (url, _, backend):
            async with connected(url) as raw:
                await raw.send(upload_head(f"Expect: {value}", f"X-API-Key: {KEY}"))
                status, _, interim = await raw.head(timeout=3.0)
                assert (status, interim) == (100, b"HTTP/1.1 100 Continue\r\n\r\n")
                await raw.send(BODY)
                status, _, body = await raw.response()
                assert (status, json.loads(body)) == (200, {"body_size": len(BODY)})
                (seen,) = backend.seen
                # the gateway met the expectation itself: the upstream is not asked again
                assert "Expect" not in seen["headers"]
                # the connection stays usable: a second request on it, without Expect
                await raw.send(upload_head(f"X-API-Key: {KEY}", length=3) + b"abc")
                status, _, body = await raw.response()
                assert (status, json.loads(body)) == (200, {"body_size": 3})

    asyncio.run(scenario())


def test_a_declared_body_over_the_limit_is_413_without_100(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path, max_body_size=1000) as (url, _, backend):
            async with connected(url) as raw:
                await raw.send(upload_head("Expect: 100-continue", f"X-API-Key: {KEY}"))
                status, headers, _ = await raw.response(timeout=3.0)
                assert (status, headers["connection"].lower()) == (413, "close")
                assert await raw.at_eof()
                assert backend.seen == []

    asyncio.run(scenario())


@pytest.mark.parametrize("value", ["foo", "100-continue, bar", "100-continue=1"])
def test_an_unknown_expectation_is_417(tmp_path: Path, value: str) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (url, _, backend):
            async with connected(url) as raw:
                await raw.send(upload_head(f"Expect: {value}", f"X-API-Key: {KEY}"))
                status, headers, body = await raw.response(timeout=3.0)
                assert (status, json.loads(body)["error"]) == (417, "expectation_failed")
                assert headers["connection"].lower() == "close"
                assert backend.seen == []

    asyncio.run(scenario())


def test_http_1_0_expectations_are_ignored(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (url, _, _backend):
            async with connected(url) as raw:
                head = upload_head("Expect: 100-continue", f"X-API-Key: {KEY}", version="1.0")
                await raw.send(head + BODY)  # a 1.0 client does not wait
                status, _, body = await raw.response()
                assert (status, json.loads(body)) == (200, {"body_size": len(BODY)})

    asyncio.run(scenario())


@pytest.mark.parametrize("over_limit", ["inspected", "rejected"])
def test_the_waf_reading_the_body_sends_100_first(tmp_path: Path, over_limit: str) -> None:
    """The WAF reads bodies before the forwarder: its read is the one that answers 100,
    and a body it refuses by its declared size alone never gets a 100."""
    waf = RouteWaf("sqli_xss", body_limit=1000 if over_limit == "rejected" else 512 * 1024)
    body = b'{"order": "' + b"o" * 5000 + b'"}'

    async def scenario() -> None:
        async with running(tmp_path, waf=waf) as (url, _, backend):
            async with connected(url) as raw:
                await raw.send(
                    upload_head(
                        "Expect: 100-continue",
                        f"X-API-Key: {KEY}",
                        "Content-Type: application/json",
                        length=len(body),
                    )
                )
                status, _, _ = await raw.head(timeout=3.0)
                if over_limit == "rejected":
                    assert status == 413
                    assert await raw.at_eof()
                    assert backend.seen == []
                    return
                assert status == 100
                await raw.send(body)
                status, _, answer = await raw.response()
                assert (status, json.loads(answer)) == (200, {"body_size": len(body)})

    asyncio.run(scenario())


async def _curl(url: str, *args: str) -> tuple[str, str, float]:
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "-v",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{size_upload}",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "10",
        *args,
        f"{url}/upload",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return out.decode(), err.decode(), time.monotonic() - started


def test_curl_waits_for_100_and_gets_it(tmp_path: Path) -> None:
    upload = tmp_path / "upload.bin"
    upload.write_bytes(BODY)

    async def scenario() -> None:
        async with running(tmp_path) as (url, _, backend):
            out, err, elapsed = await _curl(
                url, "-H", f"X-API-Key: {KEY}", "--data-binary", f"@{upload}"
            )
            assert out == f"200 {len(BODY)}"
            assert "< HTTP/1.1 100 Continue" in err
            assert elapsed < 5  # not curl's 10 s of waiting for an answer
            assert backend.seen[0]["body_size"] == len(BODY)

            out, err, elapsed = await _curl(url, "--data-binary", f"@{upload}")
            assert out == "401 0"  # refused, and curl never sent the body
            assert "100 Continue" not in err
            assert elapsed < 5

    asyncio.run(scenario())


def test_aiohttps_client_waits_for_100_and_gets_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with running(tmp_path) as (url, _, backend), aiohttp.ClientSession() as s:
            started = time.monotonic()
            async with s.post(
                f"{url}/upload", data=BODY, expect100=True, headers={"X-API-Key": KEY}
            ) as r:
                assert (r.status, await r.json()) == (200, {"body_size": len(BODY)})
            assert time.monotonic() - started < 5
            assert "Expect" not in backend.seen[0]["headers"]

    asyncio.run(scenario())


@given(
    st.lists(
        st.lists(
            st.sampled_from(["100-continue", "100-CONTINUE", "", " ", "\t", "foo", "100"]),
            max_size=4,
        ).map(",".join),
        max_size=3,
    )
)
def test_expect_values(lines: list[str]) -> None:
    members = [m.strip(" \t").lower() for line in lines for m in line.split(",")]
    members = [m for m in members if m]
    result = expects_continue(lines)
    if any(m != "100-continue" for m in members):
        assert result is None
    else:
        assert result is bool(members)
