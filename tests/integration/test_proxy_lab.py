"""HTTPS from the client namespace through the gateway's proxy to two upstreams.

The proxy runs in the gateway namespace (198.18.0.1:8443) in front of two
upstream servers in the upstream namespace (198.18.1.10:8080 and :8081).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import lab_upstream
import pytest
import trustme

from stockade.lab.netns_exec import popen_in_netns, python_argv, run_in_netns
from stockade.lab.topology import Lab

pytestmark = [pytest.mark.netns]

PORT = 8443
UP4 = "198.18.1.10"
FALL, RISE, INTERVAL = 2, 2, 0.3

CLIENT_SCRIPT = """
import json, ssl, sys, urllib.request
ctx = ssl.create_default_context(cafile=sys.argv[1])
results = []
for _ in range(int(sys.argv[3])):
    req = urllib.request.Request(sys.argv[2], headers={"Host": "api.test"})
    try:
        with urllib.request.urlopen(req, context=ctx, timeout=5) as r:
            results.append([r.status, json.loads(r.read()).get("port")])
    except urllib.error.HTTPError as e:
        results.append([e.code, None])
    except OSError as e:
        results.append([0, str(e)])
print(json.dumps(results))
"""


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    if proc.stdout is not None:
        proc.stdout.close()


@pytest.fixture
def https_proxy(
    lab: Lab, tmp_path: Path
) -> Iterator[tuple[Path, dict[int, subprocess.Popen[str]]]]:
    ca = trustme.CA()
    cert = ca.issue_cert("api.test", "198.18.0.1")
    cert_path, key_path, ca_path = tmp_path / "c.pem", tmp_path / "k.pem", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    ups = {8080: lab_upstream.start(lab, 18080), 8081: lab_upstream.start(lab, 18081)}
    config = tmp_path / "stockade.toml"
    config.write_text(
        f"""
[proxy]
metrics_dir = "{tmp_path / "metrics"}"
workers = 1
[proxy.admin]
port = 0
[[proxy.listeners]]
address = "198.18.0.1"
port = {PORT}
certificates = [{{ cert = "{cert_path}", key = "{key_path}" }}]
[proxy.pools.api]
servers = ["{UP4}:18080", "{UP4}:18081"]
[proxy.pools.api.health]
path = "/health"
interval = "{int(INTERVAL * 1000)}ms"
timeout = "200ms"
rise = {RISE}
fall = {FALL}
[proxy.pools.api.passive]
max_failures = 1000
[[proxy.routes]]
host = "api.test"
pool = "api"
"""
    )
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proxy = popen_in_netns(
            lab.gateway_ns,
            [sys.executable, "-m", "stockade.cli.main", "--config", str(config), "proxy", "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and "proxy serving" not in log.read_text():
            assert proxy.poll() is None, log.read_text()
            time.sleep(0.1)
        yield ca_path, ups
    finally:
        stop(proxy)
        for up in ups.values():
            stop(up)


def fetch(lab: Lab, ca: Path, count: int) -> list[list[object]]:
    result = run_in_netns(
        lab.client_ns,
        python_argv(
            "-c", CLIENT_SCRIPT, str(ca), f"https://198.18.0.1:{PORT}/api/hello", str(count)
        ),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows: list[list[object]] = json.loads(result.stdout)
    return rows


def test_https_balanced_failover_and_rejoin(
    lab: Lab, https_proxy: tuple[Path, dict[int, subprocess.Popen[str]]]
) -> None:
    ca, ups = https_proxy
    rows = fetch(lab, ca, 10)
    assert all(status == 200 for status, _ in rows), rows
    assert {port for _, port in rows} == {18080, 18081}

    stop(ups[8081])  # one upstream dies
    time.sleep(INTERVAL * (FALL + 2))  # active checks take it out after `fall` misses
    rows = fetch(lab, ca, 10)
    assert all(row == [200, 18080] for row in rows), rows

    ups[8081] = lab_upstream.start(lab, 18081)  # it comes back and rejoins after `rise` checks
    time.sleep(INTERVAL * (RISE + 2))
    rows = fetch(lab, ca, 10)
    assert {port for _, port in rows} == {18080, 18081}

    stop(ups[8080])
    stop(ups[8081])
    time.sleep(INTERVAL * (FALL + 2))
    started = time.monotonic()
    rows = fetch(lab, ca, 3)
    assert all(status == 503 for status, _ in rows), rows
    assert time.monotonic() - started < 3
