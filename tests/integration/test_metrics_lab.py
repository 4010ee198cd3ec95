"""Known traffic from the client namespace moves the scraped metrics by exactly that much.

The controller (native XDP on the gateway's interface) and a proxy with
several workers run in the gateway namespace, so both admin listeners are
on that namespace's loopback and are scraped from inside it. From the
client namespace: N allowed requests from one address, K requests over a
rate limit from another, and M UDP datagrams from a banned third (each one
packet dropped by XDP, with a known frame size).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from controller_harness import RunningController, running_controller
from prometheus_client.parser import text_string_to_metric_families

from stockade.lab.netns_exec import popen_in_netns, python_argv, run_in_netns
from stockade.lab.topology import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

ALLOWED_SRC, LIMITED_SRC, BANNED_SRC = "198.18.0.10", "198.18.0.11", "198.18.0.12"
GW, PORT, UPSTREAM = "198.18.0.1", 8080, "198.18.1.10:8080"
WORKERS = 3
N, LIMIT, K, M = 20, 4, 6, 25
PAYLOAD = 100
FRAME = 14 + 20 + 8 + PAYLOAD  # Ethernet + IPv4 + UDP + payload: what XDP counts as bytes

# In the client namespace: COUNT requests for PATH from SRC, one connection each;
# prints the statuses.
REQUESTS = """
import json, socket, sys
src, gw, port, path, count = sys.argv[1:6]
port, count = int(port), int(count)
statuses = []
for _ in range(count):
    with socket.create_connection((gw, port), timeout=5, source_address=(src, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    statuses.append(int(data.split(b" ", 2)[1]))
print(json.dumps(statuses))
"""

# In the client namespace: COUNT UDP datagrams of SIZE bytes from SRC to the discard port.
DATAGRAMS = """
import socket, sys
src, dst, count, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
    s.bind((src, 0))
    for _ in range(count):
        s.sendto(bytes(size), (dst, 9))
"""

# In the gateway namespace: GET a metrics URL on its loopback, print the body.
SCRAPE = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
    sys.stdout.write(response.read().decode())
"""

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def run_py(netns: str, script: str, *args: str) -> str:
    result = run_in_netns(netns, python_argv("-c", script, *args), capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def requests(lab: Lab, src: str, path: str, count: int) -> list[int]:
    statuses: list[int] = json.loads(
        run_py(lab.client_ns, REQUESTS, src, GW, str(PORT), path, str(count))
    )
    return statuses


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(found: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in found.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


@dataclass
class Gateway:
    lab: Lab
    ctl: RunningController
    config: Path
    status_dir: Path
    log: Path

    def scrape_proxy(self) -> Samples:
        admin = json.loads((self.status_dir / "admin.json").read_text())
        url = f"http://{admin['address']}:{admin['port']}/metrics"
        return parse(run_py(self.lab.gateway_ns, SCRAPE, url))

    def scrape_controller(self) -> Samples:
        where = self.ctl.api("status")["metrics"]
        url = f"http://{where['address']}:{where['port']}/metrics"
        return parse(run_py(self.lab.gateway_ns, SCRAPE, url))


def proxy_config(tmp: Path, ctl: RunningController) -> str:
    return f"""
[controller]
socket = "{ctl.socket}"
[proxy]
metrics_dir = "{tmp / "metrics"}"
status_dir = "{tmp / "status"}"
workers = {WORKERS}
[proxy.admin]
port = 0
[proxy.rate_limiting.limits.per_ip]
rate = "{LIMIT}/min"
[[proxy.listeners]]
address = "{GW}"
port = {PORT}
[proxy.pools.api]
servers = ["{UPSTREAM}"]
[proxy.pools.api.health]
enabled = false
[[proxy.routes]]
name = "hello"
path_prefix = "/api"
pool = "api"
[[proxy.routes]]
name = "health"
path_prefix = "/health"
pool = "api"
rate_limits = ["per_ip"]
"""


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    with running_controller(tmp_path, lab.gateway_ns, lab.gateway_if, mode="native") as ctl:
        config = tmp_path / "proxy.toml"
        config.write_text(proxy_config(tmp_path, ctl))
        log = tmp_path / "proxy.log"
        with log.open("wb") as out:
            proxy = popen_in_netns(
                lab.gateway_ns,
                python_argv("-m", "stockade.cli.main", "--config", str(config), "proxy", "run"),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        gw = Gateway(lab, ctl, config, tmp_path / "status", log)
        try:

            def ready() -> bool:  # serving, and every worker has published its gauges
                assert proxy.poll() is None, log.read_text()
                if not (gw.status_dir / "admin.json").exists():
                    return False
                workers = list(gw.status_dir.glob("worker-*.json"))
                found = gw.scrape_proxy()
                return len(workers) == WORKERS and any(
                    name == "stockade_proxy_upstream_up" for name, _ in found
                )

            wait_until(ready, f"the proxy did not start:\n{log.read_text()}", timeout=30)
            yield gw
        finally:
            if proxy.poll() is None:
                os.kill(proxy.pid, signal.SIGTERM)
                proxy.wait(timeout=30)


def test_known_traffic_moves_the_metrics_by_exactly_that_much(gateway: Gateway) -> None:
    lab, ctl = gateway.lab, gateway.ctl
    proxy_before, kernel_before = gateway.scrape_proxy(), gateway.scrape_controller()

    ctl.api("ban", target=BANNED_SRC, ttl="10m", reason="metrics test")
    assert requests(lab, ALLOWED_SRC, "/api/hello", N) == [200] * N
    assert requests(lab, LIMITED_SRC, "/health", LIMIT + K) == [200] * LIMIT + [429] * K
    run_py(lab.client_ns, DATAGRAMS, BANNED_SRC, GW, str(M), str(PAYLOAD))

    name = "stockade_proxy_requests_total"

    def moved(found: Samples, metric: str, **labels: str) -> float:
        return total(found, metric, **labels) - total(proxy_before, metric, **labels)

    # a worker counts a request as it finishes it: wait for the last one, then be exact
    wait_until(
        lambda: moved(gateway.scrape_proxy(), name) >= N + LIMIT + K,
        "the proxy did not count every request",
    )
    proxy = gateway.scrape_proxy()
    assert moved(proxy, name) == N + LIMIT + K
    assert moved(proxy, name, route="hello", decision="allowed", status="2xx") == N
    assert moved(proxy, name, route="health", decision="allowed", status="2xx") == LIMIT
    assert moved(proxy, name, route="health", decision="ratelimit", status="4xx") == K
    assert moved(proxy, "stockade_proxy_rate_limited_total", limit="per_ip") == K
    assert moved(proxy, "stockade_proxy_request_duration_seconds_count") == N + LIMIT + K
    assert moved(proxy, "stockade_proxy_upstream_duration_seconds_count") == N + LIMIT

    kernel = gateway.scrape_controller()

    def kernel_moved(metric: str, **labels: str) -> float:
        return total(kernel, metric, **labels) - total(kernel_before, metric, **labels)

    assert kernel_moved("stockade_xdp_packets_total", reason="drop_ban", verdict="drop") == M
    assert kernel_moved("stockade_xdp_bytes_total", reason="drop_ban") == M * FRAME
    # counted by ingress interface: all of it on the lab gateway's, none elsewhere
    gw_if = {"interface": lab.gateway_if}
    assert kernel_moved("stockade_xdp_packets_total", reason="drop_ban", **gw_if) == M
    assert kernel_moved("stockade_xdp_bytes_total", reason="drop_ban", **gw_if) == M * FRAME
    assert kernel_moved("stockade_xdp_packets_total", interface="other") == 0
    assert {
        dict(labels)["interface"]
        for name, labels in kernel
        if name.endswith("packets_total") and name.startswith("stockade_xdp")
    } == {lab.gateway_if, "other"}
    # `stockade stats --json` gives the same breakdown
    stats = ctl.api("stats")
    assert stats["by_interface"][lab.gateway_if]["reasons"]["drop_ban"]["packets"] == M
    assert stats["by_interface"][lab.gateway_if]["reasons"]["pass"]["packets"] > 0
    assert stats["by_interface"][lab.gateway_if]["total_packets"] == stats["total_packets"]
    active = {"source": "cli", "kind": "exact", "family": "ipv4"}
    assert kernel_moved("stockade_bans_active", **active) == 1
    assert kernel_moved("stockade_ban_events_total", action="ban", source="cli") == 1
    assert total(kernel, "stockade_xdp_attached", interface=lab.gateway_if, mode="native") == 1
    (ban,) = ctl.api("bans")
    assert (ban["target"], ban["packets"], ban["bytes"]) == (BANNED_SRC, M, M * FRAME)

    # `stockade top` shows the same, run where it can reach the proxy's admin listener
    frame = top_json(gateway)
    reasons = {r["reason"]: r["packets"] for r in frame["reasons"]}
    assert reasons["drop_ban"] == M  # this test's maps are new: every drop was ours
    assert [(b["target"], b["packets"]) for b in frame["top_bans"]] == [(BANNED_SRC, M)]
    routes = {r["route"]: r for r in frame["proxy"]["routes"]}
    assert routes["hello"]["requests"] == N and routes["health"]["statuses"]["4xx"] == K
    assert [u["up"] for u in frame["proxy"]["upstreams"]] == [True]


def top_json(gateway: Gateway) -> dict[str, Any]:
    argv = python_argv("-m", "stockade.cli.main", "--config", str(gateway.config), "top")
    result = run_in_netns(
        gateway.lab.gateway_ns,
        [*argv, "--json", "--interval", "0.2"],
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    frame: dict[str, Any] = json.loads(result.stdout)
    return frame
