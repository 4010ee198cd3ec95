"""The attack and benign corpora through the gateway, per WAF mode and action.

Each case goes as raw bytes to a route per mode: /sqli_xss/ and /crs/ block,
/sqli_xss_detect/ and /crs_detect/ only detect. A blocked request gets 403
(400 for a body that does not parse) with only the request id, and never
reaches the upstream; a detected one passes and is counted.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from waf_corpus import ATTACKS, BENIGN, Case
from waf_harness import HOST, RecordingUpstream, ThreadedGateway, waf_config

from stockade.proxy.settings import ProxyConfig
from stockade.proxy.waf_settings import RouteWaf

ROUTES = {
    "sqli_xss": RouteWaf("sqli_xss"),
    "crs": RouteWaf("crs"),
    "sqli_xss_detect": RouteWaf("sqli_xss", "detect"),
    "crs_detect": RouteWaf("crs", "detect"),
}
CASES = ATTACKS + BENIGN


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedGateway]:
    log = tmp_path_factory.mktemp("waf") / "access.log"

    def config(upstream: RecordingUpstream) -> ProxyConfig:
        return waf_config(upstream, log, ROUTES)

    with ThreadedGateway(config) as gw:
        yield gw


def _ids(cases: tuple[Case, ...]) -> list[str]:
    return [case.name for case in cases]


def test_the_corpora_cover_every_kind_and_place() -> None:
    kinds = {case.kind for case in ATTACKS}
    assert kinds == {"sqli", "xss", "lfi", "rce", "scanner", "protocol"}
    assert len(BENIGN) >= 20
    places = " ".join(case.name for case in ATTACKS)
    for place in ("query param", "form", "JSON", "cookie", "User-Agent", "Referer", "path"):
        assert place in places, place


@pytest.mark.parametrize("mode", ["sqli_xss", "crs"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_block_mode_verdicts(gateway: ThreadedGateway, mode: str, case: Case) -> None:
    seen = len(gateway.upstream.bodies)
    status, body = gateway.send(case.request(f"/{mode}", HOST))
    if mode in case.blocked_by:
        assert status in (400, 403), f"{case.name}: passed {mode} ({status})"
        answer = json.loads(body)
        assert set(answer) == {"error", "message", "request_id"}  # no rule details
        assert answer["error"] in ("blocked", "bad_body")
        assert len(gateway.upstream.bodies) == seen, "a blocked request reached the upstream"
    else:
        assert status == 200, f"{case.name}: {mode} answered {status}: {body[:200]!r}"
        assert len(gateway.upstream.bodies) == seen + 1


@pytest.mark.parametrize("mode", ["sqli_xss", "crs"])
@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_detect_mode_passes_everything_and_counts(
    gateway: ThreadedGateway, mode: str, case: Case
) -> None:
    assert gateway.gateway is not None
    counters = gateway.gateway.waf.counters
    before = sum(counters.detections.values())
    status, body = gateway.send(case.request(f"/{mode}_detect", HOST))
    assert status == 200, f"{case.name}: detect mode answered {status}: {body[:200]!r}"
    detected = sum(counters.detections.values()) > before
    assert detected == (mode in case.blocked_by), case.name


def test_bodies_reach_the_upstream_as_sent(gateway: ThreadedGateway) -> None:
    """What the WAF read (and decompressed to inspect) is forwarded byte for byte."""
    for case in BENIGN:
        if case.body:
            gateway.send(case.request("/sqli_xss", HOST))
            assert gateway.upstream.bodies[-1] == case.body, case.name


def test_blocks_are_counted_per_rule(gateway: ThreadedGateway) -> None:
    assert gateway.gateway is not None
    counters = gateway.gateway.waf.counters
    attack = next(c for c in ATTACKS if c.name == "sqli tautology in a query param")
    before = counters.blocks[("sqli_xss", "42100")]
    gateway.send(attack.request("/sqli_xss", HOST))
    assert counters.blocks[("sqli_xss", "42100")] == before + 1
    crs_before = counters.blocks[("crs", "942100")]
    gateway.send(attack.request("/crs", HOST))
    assert counters.blocks[("crs", "942100")] == crs_before + 1
    assert counters.blocks[("crs", "949110")] >= 1  # CRS's anomaly score decision


def test_a_block_is_logged_with_rules_and_the_variable(
    gateway: ThreadedGateway, caplog: pytest.LogCaptureFixture
) -> None:
    attack = next(c for c in ATTACKS if c.name == "sqli in a nested JSON field")
    with caplog.at_level("WARNING", logger="stockade.proxy.waf"):
        gateway.send(attack.request("/crs", HOST))
    lines = [r.getMessage() for r in caplog.records if "waf blocked" in r.getMessage()]
    assert lines, caplog.text
    assert "942100" in lines[-1] and "ARGS:json.filter.name" in lines[-1]
    assert "x' OR 1=1 --" in lines[-1] and "949110" in lines[-1]


def test_credentials_are_redacted_in_the_log(
    gateway: ThreadedGateway, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    secret = "1' or '1'='1 s3cr3t-session"
    case = Case("secret cookie", "sqli", headers=(("Cookie", f"session={secret}"),))
    with caplog.at_level("WARNING", logger="stockade.proxy.waf"):
        status, _ = gateway.send(case.request("/sqli_xss", HOST))
    assert status == 403
    assert "s3cr3t" not in caplog.text
    assert "REQUEST_COOKIES:session = '[redacted]'" in caplog.text
