"""A proxy in the lab's gateway namespace and known traffic from the client namespace.

Shared by the metrics and status-page lab tests: the controller (native
XDP) and a `stockade proxy run` of WORKERS workers in the gateway
namespace, a route /api open and a route /health under a per-IP limit of
LIMIT a minute; from the client namespace, HTTP requests on their own
connections and UDP datagrams of a known size; /metrics scraped from
inside the gateway namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from controller_harness import RunningController
from prometheus_client.parser import text_string_to_metric_families

from stockade.lab.netns_exec import popen_in_netns, python_argv, run_in_netns
from stockade.lab.topology import Lab

ALLOWED_SRC, LIMITED_SRC, BANNED_SRC = "198.18.0.10", "198.18.0.11", "198.18.0.12"
GW, PORT, UPSTREAM = "198.18.0.1", 8080, "198.18.1.10:8080"
WORKERS = 3
LIMIT = 4  # /health's requests a minute per address
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


def send_datagrams(lab: Lab, src: str, count: int) -> None:
    run_py(lab.client_ns, DATAGRAMS, src, GW, str(count), str(PAYLOAD))


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


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def proxy_config(tmp: Path, ctl: RunningController, admin: str = "") -> str:
    """The proxy's config; `admin`: more lines for [proxy.admin]."""
    return f"""
[controller]
socket = "{ctl.socket}"
[proxy]
metrics_dir = "{tmp / "metrics"}"
status_dir = "{tmp / "status"}"
workers = {WORKERS}
[proxy.admin]
port = 0
{admin}
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


@contextmanager
def running_proxy(
    lab: Lab, tmp: Path, config: str, scrape: Callable[[], Samples]
) -> Iterator[subprocess.Popen[str]]:
    """`stockade proxy run` in the gateway namespace with this config (written to
    tmp/proxy.toml, its output to tmp/proxy.log), until it serves and every worker has
    published its gauges (scrape: the proxy's /metrics); stopped by its PID after."""
    path, log, status_dir = tmp / "proxy.toml", tmp / "proxy.log", tmp / "status"
    path.write_text(config)
    with log.open("wb") as out:
        proxy = popen_in_netns(
            lab.gateway_ns,
            python_argv("-m", "stockade.cli.main", "--config", str(path), "proxy", "run"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:

        def ready() -> bool:
            assert proxy.poll() is None, log.read_text()
            if not (status_dir / "admin.json").exists():
                return False
            workers = list(status_dir.glob("worker-*.json"))
            return len(workers) == WORKERS and any(
                name == "stockade_proxy_upstream_up" for name, _ in scrape()
            )

        wait_until(ready, f"the proxy did not start:\n{log.read_text()}", timeout=30)
        yield proxy
    finally:
        if proxy.poll() is None:
            os.kill(proxy.pid, signal.SIGTERM)
            proxy.wait(timeout=30)
