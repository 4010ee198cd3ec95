"""Prometheus metrics of the real proxy: several workers counted once, a scrape that
promtool accepts, and the admin listener's credentials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_harness import free_port, running_proxy, running_upstream
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from test_ratelimit_workers import proxy_config, status_of

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with running_upstream() as port:
        yield port


def scrape_text(status_dir: Path, token: str | None = None) -> str:
    admin = json.loads((status_dir / "admin.json").read_text())
    request = urllib.request.Request(f"http://{admin['address']}:{admin['port']}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        text: str = response.read().decode()
        return text


def samples(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(found: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for (sample, sample_labels), value in found.items()
        if sample == name and set(labels.items()) <= set(sample_labels)
    )


def counted(status_dir: Path, requests: int, timeout: float = 10) -> Samples:
    """A scrape once the workers have flushed `requests` requests (they do once a second)
    and refreshed their upstream gauges."""
    deadline = time.monotonic() + timeout
    while True:
        found = samples(scrape_text(status_dir))
        flushed = (
            total(found, "stockade_proxy_requests_total") == requests
            and total(found, "stockade_proxy_request_duration_seconds_count") == requests
            and total(found, "stockade_proxy_upstream_up", pool="api") == 1
        )
        if flushed or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


EXTRA = """
[proxy.rate_limiting.limits.per_ip]
rate = "30/min"
all_routes = true
"""


def test_every_workers_requests_are_counted_once(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    status_dir = tmp_path / "status"
    with running_proxy(proxy_config(port, upstream, 2, EXTRA, ""), tmp_path, port) as proxy:
        workers = proxy.wait_workers(2)
        statuses = [status_of(port) for _ in range(40)]  # new connections: both workers
        assert statuses.count(200) == 30 and statuses.count(429) == 10
        found = counted(status_dir, 40)
        name = "stockade_proxy_requests_total"
        assert total(found, name) == 40
        assert total(found, name, status="2xx", decision="allowed", route="route0") == 30
        assert total(found, name, status="4xx", decision="ratelimit") == 10
        assert total(found, "stockade_proxy_rate_limited_total", limit="per_ip") == 10
        assert total(found, "stockade_proxy_request_duration_seconds_count") == 40
        assert total(found, "stockade_proxy_upstream_duration_seconds_count") == 30
        assert total(found, "stockade_proxy_requests_in_flight") == 0
        assert total(found, "stockade_proxy_upstream_up", pool="api") == 1
        assert total(found, "stockade_build_info") == 1
        counted_by = {
            dict(labels).get("pid")
            for (sample, labels), _ in found.items()
            if sample == name
        }
        assert counted_by == {None}  # added up across workers, no per-process series

        # a worker dies: what it counted stays counted, its replacement adds to it
        os.kill(workers[0], signal.SIGKILL)
        proxy.wait_workers(2, exclude={workers[0]})
        time.sleep(0.5)
        assert total(samples(scrape_text(status_dir)), name) == 40
        for _ in range(5):
            status_of(port)
        assert total(counted(status_dir, 45), name) == 45

        # promtool, the reference checker, accepts the exposition
        result = subprocess.run(
            ["promtool", "check", "metrics"],
            input=scrape_text(status_dir),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_a_worker_that_stops_writes_its_last_counts_first(tmp_path: Path, upstream: int) -> None:
    """Workers write their counts once a second, and once more when they stop."""
    port = free_port()
    with running_proxy(proxy_config(port, upstream, 1, "", ""), tmp_path, port) as proxy:
        proxy.wait_workers(1)
        assert [status_of(port) for _ in range(20)] == [200] * 20
        os.kill(proxy.proc.pid, signal.SIGTERM)  # within a second of the requests
        assert proxy.proc.wait(timeout=30) == 0
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path / "status" / "metrics"))
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }
    assert total(found, "stockade_proxy_requests_total") == 20
    assert total(found, "stockade_proxy_request_duration_seconds_count") == 20


def test_the_admin_listener_wants_its_token(tmp_path: Path, upstream: int) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    port = free_port()
    extra = f'[proxy.admin]\nport = 0\nbearer_token_file = "{token_file}"\n'
    text = proxy_config(port, upstream, 1, "", "").replace("[proxy.admin]\nport = 0\n", extra)
    with running_proxy(text, tmp_path, port) as proxy:
        proxy.wait_workers(1)
        status_dir = tmp_path / "status"
        for token in (None, "wrong"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                scrape_text(status_dir, token)
            refused.value.close()
            assert refused.value.code == 401
        assert "stockade_build_info" in scrape_text(status_dir, "s3cret-token")
        assert "s3cret-token" not in proxy.log.read_text()


def test_waf_blocks_are_counted_by_mode_and_rule(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    text = proxy_config(port, upstream, 2, "", 'waf = "sqli_xss"')
    with running_proxy(text, tmp_path, port) as proxy:
        proxy.wait_workers(2)
        assert status_of(port, path="/x?q=hello") == 200
        assert status_of(port, path="/x?id=1%27%20OR%20%271%27%3D%271") == 403
        time.sleep(1.5)  # the workers move WAF counts into the metrics once a second
        found = samples(scrape_text(tmp_path / "status"))
        blocks = {
            dict(labels)["rule"]: value
            for (name, labels), value in found.items()
            if name == "stockade_proxy_waf_blocks_total"
        }
        assert blocks and all(value == 1 for value in blocks.values()), blocks
        assert total(found, "stockade_proxy_waf_blocks_total", mode="sqli_xss", action="block")
        assert total(found, "stockade_proxy_requests_total", decision="waf") == 1
