"""Bodies through the WAF: size limits, compression, the time budget, the event loop."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import brotli
import pytest
from waf_harness import HOST, RecordingUpstream, ThreadedGateway, serving, waf_config

from stockade.proxy.anomaly_settings import AnomalyConfig, AnomalyRule, parse_condition
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.waf.firewall import PASS, Verdict
from stockade.proxy.waf_settings import RouteWaf, WafConfig

SQLI = json.dumps({"q": "1 UNION SELECT password FROM users--"}).encode()
CLEAN = json.dumps({"q": "hello"}).encode()


def post(target: str, body: bytes, *headers: str, chunked: bool = False) -> bytes:
    lines = [f"POST {target} HTTP/1.1", f"Host: {HOST}", "Content-Type: application/json"]
    lines += headers
    if chunked:
        lines.append("Transfer-Encoding: chunked")
        payload = (
            b"".join(
                b"%x\r\n%s\r\n" % (len(body[i : i + 4096]), body[i : i + 4096])
                for i in range(0, len(body), 4096)
            )
            + b"0\r\n\r\n"
        )
    else:
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    tmp = tmp_path_factory.mktemp("bodies")
    routes = {
        "reject": RouteWaf("sqli_xss", body_limit=1024),
        "pass": RouteWaf("sqli_xss", body_limit=1024, body_over_limit="pass"),
        "crs": RouteWaf("crs"),
        "off": RouteWaf(),
    }

    def config(upstream: RecordingUpstream) -> ProxyConfig:
        return waf_config(upstream, tmp / "access.log", routes, WafConfig(decompressed_limit=65536))

    with ThreadedGateway(config) as gw:
        yield gw


def counters(gw: ThreadedGateway) -> Any:
    assert gw.gateway is not None
    return gw.gateway.waf.counters


def test_a_body_over_the_limit_is_refused_before_the_upstream(gateway: ThreadedGateway) -> None:
    big = json.dumps({"q": "x" * 2000}).encode()
    seen = len(gateway.upstream.bodies)
    rejected = counters(gateway).body_over_limit["rejected"]
    for chunked in (False, True):
        status, answer = gateway.send(post("/reject/a", big, chunked=chunked))
        assert status == 413 and json.loads(answer)["error"] == "body_too_large"
    assert len(gateway.upstream.bodies) == seen
    assert counters(gateway).body_over_limit["rejected"] == rejected + 2


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_may_pass_uninspected_and_whole(
    gateway: ThreadedGateway, chunked: bool
) -> None:
    big = json.dumps({"q": "1 UNION SELECT password FROM users--", "pad": "x" * 200_000}).encode()
    passed = counters(gateway).body_over_limit["passed"]
    status, _ = gateway.send(post("/pass/a", big, chunked=chunked))
    assert status == 200
    assert gateway.upstream.bodies[-1] == big  # the part read to decide, then the rest
    assert counters(gateway).body_over_limit["passed"] == passed + 1
    assert gateway.send(post("/pass/a", SQLI, chunked=chunked))[0] == 403  # within: inspected


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [("gzip", gzip.compress), ("deflate", zlib.compress), ("br", brotli.compress)],
)
def test_compressed_bodies_are_inspected_decompressed(
    gateway: ThreadedGateway, encoding: str, compress: Any
) -> None:
    header = f"Content-Encoding: {encoding}"
    assert gateway.send(post("/reject/a", compress(SQLI), header))[0] == 403
    assert gateway.send(post("/reject/a", compress(CLEAN), header))[0] == 200
    assert gateway.upstream.bodies[-1] == compress(CLEAN)


def test_a_decompression_bomb_is_refused(gateway: ThreadedGateway) -> None:
    bomb = gzip.compress(b"{" + b" " * 10_000_000 + b"}")  # 10 MB from 10 KB
    assert len(bomb) < 16 * 1024
    status, answer = gateway.send(post("/crs/a", bomb, "Content-Encoding: gzip"))
    assert status == 413 and json.loads(answer)["error"] == "decompressed_too_large"
    assert counters(gateway).compressed["decompressed_too_large"] >= 1


@pytest.mark.parametrize(
    ("body", "encoding", "status", "reason"),
    [
        (b"not gzip at all", "gzip", 400, "bad_encoding"),
        (gzip.compress(CLEAN)[:-6], "gzip", 400, "bad_encoding"),
        (CLEAN, "zstd", 415, "unsupported_encoding"),
        (
            gzip.compress(gzip.compress(gzip.compress(CLEAN))),
            "gzip, gzip, gzip",
            415,
            "unsupported_encoding",
        ),
    ],
    # gzip stamps the time into its bytes: ids that do not change between collections
    ids=["not-gzip", "truncated-gzip", "zstd", "gzip-three-times"],
)
def test_bodies_that_cannot_be_decoded_are_refused(
    gateway: ThreadedGateway, body: bytes, encoding: str, status: int, reason: str
) -> None:
    got, answer = gateway.send(post("/reject/a", body, f"Content-Encoding: {encoding}"))
    assert (got, json.loads(answer)["error"]) == (status, reason)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_compressed_bodies_can_be_refused_instead(tmp_path: Path) -> None:
    async def scenario() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        config = waf_config(
            upstream, tmp_path / "log", {"a": RouteWaf("sqli_xss")}, WafConfig(compressed="reject")
        )
        async with serving(config) as (base, gw), aiohttp.ClientSession() as session:
            async with session.post(
                base + "/a/x", data=gzip.compress(CLEAN), headers={"Content-Encoding": "gzip"}
            ) as answer:
                assert answer.status == 415
                assert (await answer.json())["error"] == "compressed_body"
            assert gw.waf.counters.compressed["rejected"] == 1
        await upstream.stop()

    _run(scenario())


def test_an_inspection_over_the_time_budget_is_refused_and_the_loop_keeps_serving(
    tmp_path: Path,
) -> None:
    """The engine runs on a thread: while one inspection takes long, other requests are
    answered at once; the slow one gets 503 when its time budget is up."""

    async def scenario() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        routes = {"slow": RouteWaf("crs"), "off": RouteWaf()}
        config = waf_config(upstream, tmp_path / "log", routes, WafConfig(timeout=0.5))
        async with serving(config) as (base, gw), aiohttp.ClientSession() as session:
            real = gw.waf.evaluate

            def slow(*args: Any) -> Verdict:
                time.sleep(1.0)  # holds no GIL while sleeping, as the engine in C
                return real(*args)

            gw.waf.evaluate = slow  # type: ignore[method-assign]
            slow_request = asyncio.create_task(session.get(base + "/slow/a?q=1"))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            async with session.get(base + "/off/a") as quick:
                assert quick.status == 200
            assert time.monotonic() - started < 0.3
            answer = await slow_request
            assert answer.status == 503 and (await answer.json())["error"] == "waf_timeout"
            answer.release()
            assert gw.waf.counters.timeouts == 1
            await asyncio.sleep(0.6)  # the slow job finishes in its thread and is released
            assert gw.waf._pending == 0
        await upstream.stop()

    _run(scenario())


def test_too_many_pending_inspections_are_refused(tmp_path: Path) -> None:
    async def scenario() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        config = waf_config(
            upstream, tmp_path / "log", {"crs": RouteWaf("crs")}, WafConfig(max_pending=1)
        )
        async with serving(config) as (base, gw), aiohttp.ClientSession() as session:

            def slow(*args: Any) -> Verdict:
                time.sleep(0.3)
                return PASS

            gw.waf.evaluate = slow  # type: ignore[method-assign]

            async def get() -> int:
                async with session.get(base + "/crs/a") as answer:
                    return answer.status

            statuses = sorted(await asyncio.gather(get(), get()))
            assert statuses == [200, 503]
            assert gw.waf.counters.overloaded == 1
        await upstream.stop()

    _run(scenario())


def test_repeated_blocks_feed_the_anomaly_rules(tmp_path: Path) -> None:
    """waf_blocks counts a source's refused requests; a rule over it denies the source."""

    async def scenario() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        rule = AnomalyRule("waf-hits", "deny", condition=parse_condition("waf_blocks >= 3 in 1m"))
        config = waf_config(
            upstream,
            tmp_path / "log",
            {"a": RouteWaf("sqli_xss")},
            anomaly=AnomalyConfig(rules=(rule,)),
        )
        async with serving(config) as (base, _), aiohttp.ClientSession() as session:
            attack = base + "/a/x?id=1%27%20or%20%271%27=%271"
            for _ in range(3):
                async with session.get(attack) as answer:
                    assert (await answer.json())["error"] == "blocked"
            async with session.get(base + "/a/x?q=hello") as answer:
                assert answer.status == 403
                assert (await answer.json())["error"] == "rule:waf-hits"
        await upstream.stop()

    _run(scenario())


def test_small_requests_can_be_evaluated_on_the_loop(tmp_path: Path) -> None:
    """inline_max: the same verdicts without the thread pool."""

    async def scenario() -> None:
        upstream = RecordingUpstream()
        await upstream.start()
        config = waf_config(
            upstream, tmp_path / "log", {"a": RouteWaf("sqli_xss")}, WafConfig(inline_max=65536)
        )
        async with serving(config) as (base, gw), aiohttp.ClientSession() as session:

            def no_threads(job: Any) -> Any:
                raise AssertionError("went to the thread pool")

            gw.waf.executor.submit = no_threads  # type: ignore[method-assign]
            async with session.get(base + "/a/x?id=1%27%20or%20%271%27=%271") as answer:
                assert answer.status == 403
            async with session.post(base + "/a/x", json={"q": "O'Brien"}) as answer:
                assert answer.status == 200
        await upstream.stop()

    _run(scenario())
