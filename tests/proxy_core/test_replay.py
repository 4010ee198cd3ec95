"""`stockade replay`: a recorded access log through another config's policy stages."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import aiohttp
from proxy_harness import Upstream, config_for, gateway, log_lines

from stockade.proxy.auth_settings import RouteAuth
from stockade.proxy.ratelimit_settings import LimitRule, RateLimitConfig, parse_rate
from stockade.proxy.replay import read_log, replay, replay_file
from stockade.proxy.settings import ProxyConfig, Route


def record(tmp_path: Path) -> tuple[ProxyConfig, Path]:
    """Traffic through an open gateway, recorded in its access log."""
    log = tmp_path / "access.log"

    async def scenario() -> ProxyConfig:
        up = Upstream("a")
        await up.start()
        try:
            config = config_for([up], log)
            admin = Route(name="admin", pool="api", path_prefix="/admin")
            config = replace(config, routes=(*config.routes, admin))
            async with gateway(config) as (url, gw), aiohttp.ClientSession() as s:
                for i in range(8):
                    async with s.get(f"{url}/api/{i}", headers={"Host": "api.test"}) as r:
                        assert r.status == 200
                for _ in range(2):
                    async with s.get(f"{url}/admin/users") as r:
                        assert r.status == 200
                gw.access_log.flush()
            return config
        finally:
            await up.stop()

    return asyncio.run(scenario()), log


def test_the_log_records_what_replay_needs(tmp_path: Path) -> None:
    _, log = record(tmp_path)
    lines = log_lines(log)
    assert len(lines) == 10
    assert lines[0]["host"] == "api.test" and lines[0]["consumer"] is None
    records = [r for r in read_log(log.read_text().splitlines()) if r is not None]
    assert [r.path for r in records][:2] == ["/api/0", "/api/1"]


def test_replay_reports_what_a_new_config_would_change(tmp_path: Path) -> None:
    config, log = record(tmp_path)
    api, admin = config.routes
    stricter = replace(
        config,
        routes=(
            replace(api, rate_limits=("per_ip",)),
            replace(admin, auth=RouteAuth(mode="api_key")),
        ),
        rate_limiting=RateLimitConfig(
            limits=(LimitRule("per_ip", parse_rate("5/min"), "ip"),), max_keys=4096
        ),
    )
    report = replay_file(stricter, log)
    assert report.total == 10 and report.skipped == 0
    assert dict(report.by_change) == {
        "allowed -> ratelimit:limit:per_ip": 3,  # the 6th to 8th /api requests
        "allowed -> auth:missing": 2,  # /admin now wants a key nobody recorded
    }
    assert [c["path"] for c in report.changed][:3] == ["/api/5", "/api/6", "/api/7"]
    # the same config changes nothing
    assert replay_file(config, log).changed == []


def test_replay_runs_on_the_logs_clock(tmp_path: Path) -> None:
    """A limit of 2/min: requests a minute apart in the log all pass."""
    config, _ = record(tmp_path)
    limited = replace(
        config,
        routes=tuple(replace(r, rate_limits=("per_ip",)) for r in config.routes),
        rate_limiting=RateLimitConfig(
            limits=(LimitRule("per_ip", parse_rate("2/min"), "ip"),), max_keys=4096
        ),
    )
    lines = [
        json.dumps(
            {
                "time": 1_800_000_000 + 61 * i,
                "client_ip": "198.18.0.10",
                "method": "GET",
                "host": "api.test",
                "path": "/api/x",
                "status": 200,
                "decision": "allowed",
            }
        )
        for i in range(5)
    ] + ["not json", ""]
    report = asyncio.run(replay(limited, read_log(lines)))
    assert (report.total, report.skipped, report.changed) == (5, 2, [])


def test_the_cli_reports_and_refuses_bad_input(tmp_path: Path) -> None:
    _, log = record(tmp_path)
    config = tmp_path / "new.toml"
    config.write_text(
        f"""
[proxy]
access_log = "{tmp_path / "ignored.log"}"
[proxy.rate_limiting.limits.per_ip]
rate = "4/min"
all_routes = true
[proxy.pools.api]
servers = ["127.0.0.1:9"]
[[proxy.routes]]
pool = "api"
"""
    )
    cli = [sys.executable, "-m", "stockade.cli.main", "replay", str(log), "--config", str(config)]
    result = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["requests"] == 10 and data["changed"] == 6
    assert data["by_change"] == {"allowed -> ratelimit:limit:per_ip": 6}
    assert not (tmp_path / "ignored.log").exists()  # the replay never writes the live log
    plain = subprocess.run(cli, capture_output=True, text=True, timeout=60)
    assert "6 would be treated differently" in plain.stdout
    missing = subprocess.run(
        [*cli[:4], str(tmp_path / "nope.log"), "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_a_recorded_client_abort_or_upstream_error_is_not_a_policy_change(
    tmp_path: Path,
) -> None:
    """Both passed every check: the same config replays them as allowed, not as changes."""
    config, _ = record(tmp_path)
    lines = [
        json.dumps(
            {
                "time": 1_800_000_000 + i,
                "client_ip": "198.18.0.10",
                "method": "POST",
                "host": "api.test",
                "path": "/api/upload",
                "status": status,
                "decision": decision,
                "reason": reason,
            }
        )
        for i, (status, decision, reason) in enumerate(
            [
                (499, "client_abort", "during_request_body"),
                (502, "upstream_error", "upstream_failed"),
            ]
        )
    ]
    report = asyncio.run(replay(config, read_log(lines)))
    assert (report.total, report.changed) == (2, [])
