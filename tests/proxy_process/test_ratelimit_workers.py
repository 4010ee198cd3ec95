"""Limits and quotas in the real process: several workers, restarts."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_harness import STOCKADE, free_port, running_proxy, running_upstream

from stockade.proxy.api_keys import generate_key


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with running_upstream() as port:
        yield port


def proxy_config(port: int, upstream: int, workers: int, extra: str, route: str) -> str:
    return f"""
[controller]
socket = "/nonexistent/stockade-test/control.sock"
[proxy]
metrics_dir = "{{status_dir}}/metrics"
workers = {workers}
drain_timeout = "5s"
status_dir = "{{status_dir}}"
{extra}
[proxy.admin]
port = 0
[[proxy.listeners]]
address = "127.0.0.1"
port = {port}
[proxy.pools.api]
servers = ["127.0.0.1:{upstream}"]
[proxy.pools.api.health]
enabled = false
[[proxy.routes]]
pool = "api"
{route}
"""


def status_of(port: int, headers: str = "", path: str = "/x") -> int:
    """One request on its own connection: the kernel may hand it to any worker."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: t\r\n{headers}Connection: close\r\n\r\n".encode()
        )
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


KEY, ENTRY = generate_key("acme", "free")
API_KEY_TABLE = f"""
[[proxy.auth.api_keys]]
key_id = "{ENTRY.key_id}"
salt = "{ENTRY.salt.hex()}"
digest = "{ENTRY.digest.hex()}"
consumer = "acme"
plan = "free"
"""


@pytest.mark.parametrize(
    ("key", "rate", "headers", "path"),
    [
        ("ip", "60/30s", "", "/x"),
        ("header:X-Tenant", "60/min", "X-Tenant: t1\r\n", "/x"),
        ("query:key", "60/hour", "", "/x?key=k1"),
        ("api_key", "60/day", f"X-API-Key: {KEY}\r\n", "/x"),
        ("consumer", "60/min", f"X-API-Key: {KEY}\r\n", "/x"),
    ],
    ids=["ip", "header", "query", "api_key", "consumer"],  # KEY is random: not in an id
)
def test_a_limit_holds_across_workers(
    tmp_path: Path, upstream: int, key: str, rate: str, headers: str, path: str
) -> None:
    port = free_port()
    extra = f"""
[proxy.rate_limiting.limits.limit]
rate = "{rate}"
key = "{key}"
all_routes = true
{API_KEY_TABLE}
"""
    route = 'auth = "api_key"' if key in ("api_key", "consumer") else ""
    with running_proxy(proxy_config(port, upstream, 4, extra, route), tmp_path, port) as proxy:
        proxy.wait_workers(4)
        statuses: list[int] = []
        lock = threading.Lock()

        def client() -> None:
            for _ in range(30):
                status = status_of(port, headers, path)
                with lock:
                    statuses.append(status)

        threads = [threading.Thread(target=client) for _ in range(8)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert time.monotonic() - started < 30, "the test must stay inside one window"
        assert len(statuses) == 240 and set(statuses) == {200, 429}
        # the limit, whatever worker each connection went to (within 10%; the
        # shared counters make it exact)
        assert 60 <= statuses.count(200) <= 66
        # and the refusals came from more than one worker: the count really was shared
        time.sleep(1.5)  # status files are rewritten every second
        refusing = 0
        for status_file in (tmp_path / "status").glob("worker-*.json"):
            data = json.loads(status_file.read_text())
            refusing += data["rate_limited"].get("limit", 0) > 0
        assert refusing >= 2


def test_quota_usage_survives_a_restart(tmp_path: Path, upstream: int) -> None:
    key, entry = generate_key("acme", "free")
    extra = f"""
[proxy.quotas]
database = "{tmp_path / "usage.db"}"
[proxy.quotas.plans.free]
per_day = 5
[[proxy.auth.api_keys]]
key_id = "{entry.key_id}"
salt = "{entry.salt.hex()}"
digest = "{entry.digest.hex()}"
consumer = "acme"
plan = "free"
"""
    route = 'auth = "api_key"'
    header = f"X-API-Key: {key}\r\n"
    port = free_port()
    text = proxy_config(port, upstream, 2, extra, route)
    with running_proxy(text, tmp_path, port):
        assert [status_of(port, header) for _ in range(3)] == [200, 200, 200]
    # SIGTERM stopped it; the usage was written on the way out
    with running_proxy(text, tmp_path, port):
        assert [status_of(port, header) for _ in range(3)] == [200, 200, 429]


def test_a_bad_rate_map_stops_the_proxy_at_start(tmp_path: Path, upstream: int) -> None:
    bad = tmp_path / "tenants.map"
    bad.write_text("gold lots\n")
    extra = f"""
[proxy.rate_limiting.limits.tenant]
rate = "10/s"
key = "header:X-Tenant"
map = "{bad}"
all_routes = true
"""
    config = tmp_path / "stockade.toml"
    config.write_text(
        proxy_config(free_port(), upstream, 1, extra, "").replace(
            "{status_dir}", str(tmp_path / "status")
        )
    )
    result = subprocess.run(
        [*STOCKADE, "--config", str(config), "proxy", "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"{bad}:1" in result.stderr and "invalid rate" in result.stderr
