"""Where `stockade top` reads: the controller (control socket) and the proxy (admin listener).

The kernel's counters and the bans come over the control socket (`stats`,
`bans`, `status`), as for `stockade stats` and `stockade bans`. The proxy's
numbers come from its Prometheus endpoint: the master writes where it
listens to proxy.status_dir/admin.json, and the scrape is already added up
across workers there. A proxy that is not running is a state to show, not
an error.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from stockade.admin_http import AdminError, Credentials
from stockade.cli.client import call
from stockade.protocol import CommandError
from stockade.proxy.admin import ADMIN_FILE
from stockade.proxy.settings import ProxyConfig

SCRAPE_TIMEOUT = 2.0  # a frame must not wait long for a stuck proxy

REQUESTS = "stockade_proxy_requests_total"
DURATION_BUCKET = "stockade_proxy_request_duration_seconds_bucket"
UPSTREAM_UP = "stockade_proxy_upstream_up"
UPSTREAM_IN_FLIGHT = "stockade_proxy_upstream_in_flight"
IN_FLIGHT = "stockade_proxy_requests_in_flight"


@dataclass(frozen=True)
class KernelSample:
    reasons: dict[str, tuple[int, int]]  # reason -> (packets, bytes)
    bans: list[dict[str, Any]]  # as `stockade bans --json`
    status: dict[str, Any]  # as `stockade status --json` (controller part)


@dataclass(frozen=True)
class ProxySample:
    requests: dict[tuple[str, str, str], float]  # (route, status class, decision) -> total
    buckets: dict[str, dict[float, float]]  # route -> upper bound -> cumulative count
    upstreams: dict[tuple[str, str], tuple[float, float]]  # (pool, server) -> (up, in flight)
    in_flight: float


@dataclass(frozen=True)
class Sample:
    at: float  # time.monotonic()
    kernel: KernelSample | None
    kernel_error: str | None  # why there is no kernel sample
    proxy: ProxySample | None
    proxy_state: str  # "running", or why not


def kernel_sample(socket_path: Path) -> KernelSample:
    """Raises CommandError (ControllerUnavailable when it is down)."""
    stats = call(socket_path, "stats")
    reasons = {
        name: (int(value["packets"]), int(value["bytes"]))
        for name, value in stats["reasons"].items()
    }
    return KernelSample(reasons, list(call(socket_path, "bans")), call(socket_path, "status"))


class ProxyDown(Exception):
    """The proxy cannot be scraped; the message says why, for the frame."""


def admin_url(status_dir: Path) -> str:
    """The proxy's metrics URL from admin.json; ProxyDown when it is not running."""
    path = status_dir / ADMIN_FILE
    try:
        where = json.loads(path.read_text())
    except FileNotFoundError:
        raise ProxyDown(f"not running (no {path})") from None
    except (OSError, ValueError) as exc:
        raise ProxyDown(f"cannot read {path}: {exc}") from None
    try:
        os.kill(int(where["pid"]), 0)
    except ProcessLookupError:
        raise ProxyDown(f"not running (pid {where['pid']} in {path} is gone)") from None
    except PermissionError:
        pass  # alive, someone else's
    host = str(where["address"])
    # a wildcard listener is reached on loopback
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{int(where['port'])}/metrics"


def scrape(url: str, authorization: str | None) -> str:
    request = urllib.request.Request(url)
    if authorization is not None:
        request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=SCRAPE_TIMEOUT) as response:
            text: str = response.read().decode()
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 401:
            raise ProxyDown(f"{url} refused the credentials in [proxy.admin]") from None
        raise ProxyDown(f"{url} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ProxyDown(f"not running (nothing answers at {url}: {reason})") from None
    return text


def parse_proxy(text: str) -> ProxySample:
    requests: dict[tuple[str, str, str], float] = {}
    buckets: dict[str, dict[float, float]] = {}
    up: dict[tuple[str, str], float] = {}
    in_flight: dict[tuple[str, str], float] = {}
    total_in_flight = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if s.name == REQUESTS:  # methods added up
                key = (labels["route"], labels["status"], labels["decision"])
                requests[key] = requests.get(key, 0.0) + s.value
            elif s.name == DURATION_BUCKET:
                buckets.setdefault(labels["route"], {})[float(labels["le"])] = s.value
            elif s.name == UPSTREAM_UP:
                up[(labels["pool"], labels["server"])] = s.value
            elif s.name == UPSTREAM_IN_FLIGHT:
                in_flight[(labels["pool"], labels["server"])] = s.value
            elif s.name == IN_FLIGHT:
                total_in_flight = s.value
    upstreams = {key: (value, in_flight.get(key, 0.0)) for key, value in up.items()}
    return ProxySample(requests, buckets, upstreams, total_in_flight)


def authorization(config: ProxyConfig) -> str | None:
    """The header the admin listener wants, from the same files it reads; AdminError."""
    expected = Credentials(config.admin).expected
    return expected[0].decode("latin-1") if expected else None


def proxy_sample(config: ProxyConfig) -> tuple[ProxySample | None, str]:
    if not config.admin.enabled:
        return None, "metrics are off ([proxy.admin] enabled = false)"
    try:
        url = admin_url(config.status_dir)
        return parse_proxy(scrape(url, authorization(config))), "running"
    except ProxyDown as exc:
        return None, str(exc)
    except AdminError as exc:
        return None, str(exc)
    except ValueError as exc:  # not the exposition format
        return None, f"cannot parse the proxy's metrics: {exc}"


def take_sample(socket_path: Path, config: ProxyConfig) -> Sample:
    at = time.monotonic()
    kernel: KernelSample | None = None
    error: str | None = None
    try:
        kernel = kernel_sample(socket_path)
    except CommandError as exc:
        error = exc.message + (f"; {exc.hint}" if exc.hint else "")
    proxy, state = proxy_sample(config)
    return Sample(at, kernel, error, proxy, state)
