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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from controller_harness import RunningController, running_controller
from metrics_traffic_lab import (
    ALLOWED_SRC,
    BANNED_SRC,
    FRAME,
    LIMIT,
    LIMITED_SRC,
    Samples,
    parse,
    proxy_config,
    requests,
    run_py,
    running_proxy,
    send_datagrams,
    total,
    wait_until,
)

from stockade.lab.netns_exec import python_argv, run_in_netns
from stockade.lab.topology import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

N, K, M = 20, 6, 25

# In the gateway namespace: GET a metrics URL on its loopback, print the body.
SCRAPE = """
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=10) as response:
    sys.stdout.write(response.read().decode())
"""


@dataclass
class Gateway:
    lab: Lab
    ctl: RunningController
    config: Path
    status_dir: Path

    def scrape_proxy(self) -> Samples:
        admin = json.loads((self.status_dir / "admin.json").read_text())
        url = f"http://{admin['address']}:{admin['port']}/metrics"
        return parse(run_py(self.lab.gateway_ns, SCRAPE, url))

    def scrape_controller(self) -> Samples:
        where = self.ctl.api("status")["metrics"]
        url = f"http://{where['address']}:{where['port']}/metrics"
        return parse(run_py(self.lab.gateway_ns, SCRAPE, url))


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    with running_controller(tmp_path, lab.gateway_ns, lab.gateway_if, mode="native") as ctl:
        gw = Gateway(lab, ctl, tmp_path / "proxy.toml", tmp_path / "status")
        with running_proxy(lab, tmp_path, proxy_config(tmp_path, ctl), gw.scrape_proxy):
            yield gw


def test_known_traffic_moves_the_metrics_by_exactly_that_much(gateway: Gateway) -> None:
    lab, ctl = gateway.lab, gateway.ctl
    proxy_before, kernel_before = gateway.scrape_proxy(), gateway.scrape_controller()

    ctl.api("ban", target=BANNED_SRC, ttl="10m", reason="metrics test")
    assert requests(lab, ALLOWED_SRC, "/api/hello", N) == [200] * N
    assert requests(lab, LIMITED_SRC, "/health", LIMIT + K) == [200] * LIMIT + [429] * K
    send_datagrams(lab, BANNED_SRC, M)

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
