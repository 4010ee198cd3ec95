"""The proxy's status page in a real browser shows what the metrics show, after known
traffic in the lab.

The controller (native XDP on the gateway's interface) and a proxy with
three workers run in the gateway namespace; the proxy's admin listener
wants basic auth. From the client namespace: N allowed requests, LIMIT + K
over a rate limit, M UDP datagrams from a banned address. Headless Chromium,
started in the gateway namespace, loads the page with the credentials; its
DOM is read table by table and compared with a scrape of /metrics and with
the controller's own counters. A screenshot is kept as an artifact.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from chromium_headless import (
    by,
    dump_dom,
    keep_artifact,
    png_size,
    read_page,
    screenshot,
)
from controller_harness import RunningController, running_controller
from metrics_traffic_lab import (
    ALLOWED_SRC,
    BANNED_SRC,
    FRAME,
    LIMIT,
    LIMITED_SRC,
    UPSTREAM,
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

from stockade.lab.topology import Lab
from stockade.stats_view import latency, quantile

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

QUIET_PREFIX = "198.18.77.0/24"  # banned for good, never sends
N, K, M = 12, 5, 17
USER, PASSWORD = "operator", "pa55-w0rd"
# from a client, as far as the page knows: it must come out as text, never as markup
REASON = '<script>alert("x")</script> & <b>scanner</b>'
WINDOW = (1400, 1000)

# GET (or another method) on the admin listener: prints status, WWW-Authenticate, body.
ADMIN = """
import base64, json, sys, urllib.error, urllib.request
url, method, auth = sys.argv[1], sys.argv[2], sys.argv[3]
request = urllib.request.Request(url, method=method, data=b"x" if method == "POST" else None)
if auth:
    request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
try:
    with urllib.request.urlopen(request, timeout=10) as r:
        status, headers, body = r.status, r.headers, r.read().decode()
except urllib.error.HTTPError as e:
    status, headers, body = e.code, e.headers, e.read().decode()
print(json.dumps({"status": status, "challenge": headers.get_all("WWW-Authenticate") or [],
                  "allow": headers.get("Allow"), "type": headers.get("Content-Type"),
                  "csp": headers.get("Content-Security-Policy"), "body": body}))
"""


@dataclass
class Gateway:
    lab: Lab
    ctl: RunningController
    status_dir: Path

    @property
    def admin_base(self) -> str:
        admin = json.loads((self.status_dir / "admin.json").read_text())
        return f"http://{admin['address']}:{admin['port']}"

    def admin(self, path: str, method: str = "GET", auth: str = f"{USER}:{PASSWORD}") -> Any:
        """The reply to one request (as the ADMIN script prints it)."""
        return json.loads(run_py(self.lab.gateway_ns, ADMIN, self.admin_base + path, method, auth))

    def scrape(self) -> Samples:
        reply = self.admin("/metrics")
        assert reply["status"] == 200, reply
        return parse(reply["body"])


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Iterator[Gateway]:
    password = tmp_path / "admin.pw"
    password.write_text(PASSWORD + "\n")
    admin = f'basic_auth_user = "{USER}"\nbasic_auth_password_file = "{password}"'
    with running_controller(tmp_path, lab.gateway_ns, lab.gateway_if, mode="native") as ctl:
        gw = Gateway(lab, ctl, tmp_path / "status")
        with running_proxy(lab, tmp_path, proxy_config(tmp_path, ctl, admin), gw.scrape):
            yield gw


def buckets(found: Samples, route: str) -> dict[float, float]:
    name = "stockade_proxy_request_duration_seconds_bucket"
    return {
        float(dict(labels)["le"]): value
        for (sample, labels), value in found.items()
        if sample == name and dict(labels)["route"] == route
    }


def test_the_page_shows_what_the_metrics_show(gateway: Gateway, tmp_path: Path) -> None:
    lab, ctl = gateway.lab, gateway.ctl
    ctl.api("ban", target=BANNED_SRC, ttl="10m", reason=REASON)
    ctl.api("ban", target=QUIET_PREFIX)
    assert requests(lab, ALLOWED_SRC, "/api/hello", N) == [200] * N
    assert requests(lab, LIMITED_SRC, "/health", LIMIT + K) == [200] * LIMIT + [429] * K
    send_datagrams(lab, BANNED_SRC, M)
    name = "stockade_proxy_requests_total"
    wait_until(
        lambda: total(gateway.scrape(), name) >= N + LIMIT + K,
        "the proxy did not count every request",
    )

    metrics = gateway.scrape()
    kernel_before = ctl.api("stats")["reasons"]
    url = gateway.admin_base.replace("://", f"://{USER}:{PASSWORD}@") + "/status"
    dom = dump_dom(tmp_path / "profile", url, lab.gateway_ns)
    kernel_after = ctl.api("stats")["reasons"]
    (tmp_path / "status.html").write_text(dom)
    keep_artifact(tmp_path / "status.html")
    page = read_page(dom)

    # it refreshes itself, and nothing from a client became markup
    assert {"http-equiv": "refresh", "content": "5"} in page.metas
    assert "script" not in page.elements and "b" not in page.elements

    # -- the kernel: packets by reason as the controller counts them
    reasons = by(page.tables["reasons"], "reason")
    for reason, row in reasons.items():
        before, after = kernel_before[reason], kernel_after[reason]
        assert before["packets"] <= int(row["packets"]) <= after["packets"], reason
        assert before["bytes"] <= int(row["bytes"]) <= after["bytes"], reason
    assert (reasons["drop_ban"]["packets"], reasons["drop_ban"]["verdict"]) == (str(M), "drop")
    assert reasons["drop_ban"]["bytes"] == str(M * FRAME)

    # -- bans: by hits, and the one that expires
    top = by(page.tables["bans-top"], "target")
    assert list(top) == [BANNED_SRC, QUIET_PREFIX]  # most packets first
    assert top[BANNED_SRC]["packets"] == str(M)
    assert top[BANNED_SRC]["reason"] == REASON  # shown as text, exactly
    assert top[BANNED_SRC]["source"] == "cli" and top[QUIET_PREFIX]["expires"] == "never"
    (expiring,) = page.tables["bans-expiring"]
    assert expiring["target"] == BANNED_SRC
    assert re.fullmatch(r"in (9m[0-9]+s|10m)", expiring["expires"]), expiring  # 10m, less a bit
    controller = page.texts["controller"]
    assert f"pid {ctl.proc.pid}" in controller and "enforcing" in controller
    assert f"{lab.gateway_if} (native)" in controller and "bans: 2" in controller

    # -- the proxy: requests by route and status class, as /metrics counts them
    routes = by(page.tables["routes"], "route")
    for route in ("hello", "health"):
        row = routes[route]
        assert row["requests"] == str(int(total(metrics, name, route=route)))
        for cls in ("2xx", "3xx", "4xx", "5xx"):
            assert row[cls] == str(int(total(metrics, name, route=route, status=cls))), cls
        # the first view has no earlier one: latency over everything the histogram holds
        found = buckets(metrics, route)
        assert (row["p50"], row["p99"]) == (
            latency(quantile(0.5, found)),
            latency(quantile(0.99, found)),
        )
        assert row["req/s"] == "-"  # rates need an earlier view
    assert (routes["hello"]["requests"], routes["hello"]["2xx"]) == (str(N), str(N))
    assert routes["health"]["2xx"] == str(LIMIT) and routes["health"]["4xx"] == str(K)
    assert page.footers["routes"]["requests"] == str(N + LIMIT + K)
    assert "since the proxy started" in page.texts["routes-title"]

    decisions = {d["decision"]: d["requests"] for d in page.tables["decisions"]}
    assert decisions == {"allowed": str(N + LIMIT), "ratelimit": str(K)}
    for decision, count in decisions.items():
        assert count == str(int(total(metrics, name, decision=decision)))

    (server,) = page.tables["upstreams"]
    assert (server["pool"], server["server"], server["state"]) == ("api", UPSTREAM, "UP")
    assert total(metrics, "stockade_proxy_upstream_up", pool="api", server=UPSTREAM) == 1
    assert server["in flight"] == "0"

    # -- a screenshot for people to look at
    png = tmp_path / "status-page.png"
    screenshot(tmp_path / "profile", url, png, WINDOW, lab.gateway_ns)
    assert png_size(png) == WINDOW and png.stat().st_size > 20_000  # drawn, not blank
    keep_artifact(png)


def test_the_page_wants_the_listeners_credentials(gateway: Gateway, tmp_path: Path) -> None:
    for auth in ("", f"{USER}:wrong"):
        refused = gateway.admin("/status", auth=auth)
        assert refused["status"] == 401 and refused["body"] == ""
        # Basic is offered, so a browser asks for the password
        assert refused["challenge"] == ['Basic realm="stockade-admin", charset="UTF-8"']
    # a browser without them sees no number
    dom = dump_dom(tmp_path / "profile", gateway.admin_base + "/status", gateway.lab.gateway_ns)
    assert "stockade status" not in dom and "Requests by route" not in dom

    page = gateway.admin("/")  # the root is the page too
    assert page["status"] == 200 and page["type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page["csp"] and "Requests by route" in page["body"]
    for method in ("POST", "PUT", "DELETE"):  # read-only
        refused = gateway.admin("/status", method=method)
        assert (refused["status"], refused["allow"]) == (405, "GET, HEAD"), method
    assert gateway.admin("/metrics", method="POST")["status"] == 405
