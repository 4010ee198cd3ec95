"""`stockade replay` decides a flagged request from its recorded WAF matches: under the
new config's exclusions, anomaly threshold and action (the body is not in the log)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from stockade.proxy.replay import read_log, replay
from stockade.proxy.settings import HealthCheck, Pool, ProxyConfig, Route, Server
from stockade.proxy.waf_settings import CrsConfig, Exclusion, RouteWaf, WafConfig


def _line(n: int, decision: str, reason: str | None, waf: dict[str, Any] | None) -> str:
    record: dict[str, Any] = {
        "time": "2025-01-31T12:00:00.000Z",
        "request_id": f"r{n}",
        "client_ip": "198.18.0.10",
        "method": "POST",
        "host": "api.example.com",
        "path": "/api/orders",
        "consumer": None,
        "route": "api",
        "status": 403 if decision == "waf" else 200,
        "bytes_in": 0,
        "decision": decision,
        "reason": reason,
    }
    if waf is not None:
        record["waf"] = waf
    return json.dumps(record)


BENIGN = {
    "mode": "crs",
    "score": 5,
    "matches": [{"rule": "942360", "var": "ARGS:json.address.line1", "points": 5}],
}
ATTACK = {
    "mode": "crs",
    "score": 15,
    "matches": [
        {"rule": "942100", "var": "ARGS:json.q", "points": 5},
        {"rule": "942190", "var": "ARGS:json.q", "points": 5},
        {"rule": "942360", "var": "ARGS:json.q", "points": 5},
    ],
}
LOG = [
    _line(1, "allowed", "waf_detect:blocked", BENIGN),
    _line(2, "allowed", "waf_detect:blocked", ATTACK),
    _line(3, "waf", "blocked", BENIGN),  # recorded in block mode
    _line(4, "allowed", None, None),
]


def _config(policy: RouteWaf, threshold: int = 5) -> ProxyConfig:
    pool = Pool("api", (Server("127.0.0.1", 9),), health=HealthCheck(enabled=False))
    return ProxyConfig(
        routes=(Route("api", "api", path_prefix="/api/", waf=policy),),
        pools=(pool,),
        workers=1,
        waf=WafConfig(crs=CrsConfig(anomaly_threshold=threshold)),
    )


def _changes(config: ProxyConfig) -> dict[str, int]:
    report = asyncio.run(replay(config, read_log(LOG)))
    return dict(report.by_change)


def test_block_mode_refuses_what_was_only_detected() -> None:
    assert _changes(_config(RouteWaf("crs", "block"))) == {"allowed -> waf:blocked": 2}


def test_an_exclusion_passes_what_it_covers_and_only_that() -> None:
    tuned = RouteWaf(
        "crs",
        "block",
        exclusions=(Exclusion(("942360",), ("json.address.line1",), "addresses"),),
    )
    assert _changes(_config(tuned)) == {
        "allowed -> waf:blocked": 1,  # the attack: other rules still score 10
        "waf:blocked -> allowed": 1,  # the block-mode record of the benign request
    }


def test_the_threshold_of_the_new_config_applies() -> None:
    assert _changes(_config(RouteWaf("crs", "block"), threshold=20)) == {
        "waf:blocked -> allowed": 1
    }


def test_detect_mode_changes_no_outcome() -> None:
    assert _changes(_config(RouteWaf("crs", "detect"))) == {"waf:blocked -> allowed": 1}
    # another mode than recorded: the WAF runs on what the log holds (no body: passes)
    assert _changes(_config(RouteWaf("sqli_xss", "block"))) == {"waf:blocked -> allowed": 1}
