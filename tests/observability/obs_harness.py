"""A gateway on loopback for the observability tests: controller, upstream, proxy.

The controller runs without an interface (the program loads, the maps are
pinned under a directory of its own, the control API and the metrics
listener serve); the proxy runs as a real master with workers in front of
a small upstream on 127.0.0.1. Every process is started here and stopped
by its PID, also when a test fails; the controller's pins are removed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stockade.cli.client import ControllerUnavailable, call, wait_until_serving
from stockade.config import load_config
from stockade.controller import loader
from stockade.controller.daemon import program_settings

STOCKADE = (sys.executable, "-m", "stockade.cli.main")
UPSTREAM_APP = Path(__file__).parents[1] / "proxy_process" / "upstream_app.py"
STOP_TIMEOUT = 30.0
LIMIT = 5  # per minute, on the "limited" route

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM by PID, SIGKILL if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def controller_toml(home: Path, pin_root: Path, settings: str = "") -> str:
    """`settings`: more [controller] keys."""
    return f"""
[controller]
{settings}
socket = "{home}/control.sock"
state_dir = "{home}/lib"
pin_root = "{pin_root}"
sweep_interval = "1s"

[controller.admin]
port = 0

[xdp]
interfaces = []
management_networks = ["198.18.200.0/24"]
max_bans_v4 = 1024
max_bans_v6 = 1024
max_prefix_bans = 256
max_allow = 256
max_rate_sources = 1024
"""


@dataclass
class Controller:
    home: Path
    config: Path
    socket: Path
    proc: subprocess.Popen[bytes]

    def api(self, command: str, **args: Any) -> Any:
        return call(self.socket, command, **args)

    @property
    def metrics_port(self) -> int:
        port: int = self.api("status")["metrics"]["port"]
        return port

    def scrape(self) -> str:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def clear(self) -> None:
        for ban in self.api("bans"):
            self.api("unban", target=ban["target"])


@contextmanager
def running_controller(home: Path, settings: str = "") -> Iterator[Controller]:
    pin_root = Path(f"/sys/fs/bpf/stockade-obstest-{os.getpid()}-{home.name}"[:200])
    config = home / "controller.toml"
    config.write_text(controller_toml(home, pin_root, settings))
    socket_path = load_config(config).controller.socket
    log = home / "controller.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*STOCKADE, "--config", str(config), "controller", "run"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_until_serving(socket_path, proc, 60)
        except ControllerUnavailable as exc:
            pytest.fail(f"{exc.message}:\n{log.read_text()[-3000:]}")
        yield Controller(home, config, socket_path, proc)
    finally:
        stop(proc)
        loader.remove_pins(program_settings(load_config(config)))
        shutil.rmtree(pin_root, ignore_errors=True)


@contextmanager
def running_upstream() -> Iterator[int]:
    """tests/proxy_process/upstream_app.py (200 for any path) on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(UPSTREAM_APP), str(port)])
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, "the upstream exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "the upstream did not listen"
                time.sleep(0.05)
        yield port
    finally:
        stop(proc)


def proxy_toml(home: Path, port: int, upstream: int, workers: int, extra: str) -> str:
    """Routes: `login` (API key: any key sent is wrong), `limited` (LIMIT a minute per
    address), everything else to `api`; an anomaly rule that logs repeated auth failures."""
    return f"""
[proxy]
metrics_dir = "{home}/metrics"
status_dir = "{home}/status"
workers = {workers}
drain_timeout = "5s"
[proxy.admin]
port = 0
[proxy.rate_limiting.limits.per_ip]
rate = "{LIMIT}/min"
[[proxy.anomaly.rules]]
name = "brute"
when = "auth_failures_same_path > 2 in 1m"
action = "log"
[[proxy.listeners]]
address = "127.0.0.1"
port = {port}
[proxy.pools.api]
servers = ["127.0.0.1:{upstream}"]
[proxy.pools.api.health]
enabled = false
[[proxy.routes]]
name = "login"
path_prefix = "/login"
pool = "api"
auth = "api_key"
[[proxy.routes]]
name = "limited"
path_prefix = "/limited"
pool = "api"
rate_limits = ["per_ip"]
[[proxy.routes]]
name = "api"
pool = "api"
{extra}
"""


@dataclass
class Proxy:
    home: Path
    config: Path  # the controller's config plus [proxy]: `stockade top` reads both
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    sent: int = 0  # requests sent through `get`

    @property
    def status_dir(self) -> Path:
        return self.home / "status"

    @property
    def admin(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.status_dir / "admin.json").read_text())
        return data

    def scrape(self) -> str:
        return scrape(f"http://127.0.0.1:{self.admin['port']}/metrics")

    def get(self, path: str, headers: str = "", host: str = "t") -> int:
        self.sent += 1
        return get(self.port, path, headers, host)

    def wait_counted(self, timeout: float = 10) -> None:
        """Until the metrics count every request sent (workers flush them once a second)."""
        deadline = time.monotonic() + timeout
        while total(samples(self.scrape()), "stockade_proxy_requests_total") < self.sent:
            assert time.monotonic() < deadline, f"{self.sent} requests not counted"
            time.sleep(0.1)


@contextmanager
def running_proxy(
    home: Path, controller: Controller, upstream: int, workers: int = 2, extra: str = ""
) -> Iterator[Proxy]:
    """A proxy whose config also names `controller` (its socket, for `stockade top`)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = home / "stockade.toml"
    config.write_text(
        controller.config.read_text() + proxy_toml(home, port, upstream, workers, extra)
    )
    log = home / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*STOCKADE, "--config", str(config), "proxy", "run"],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    proxy = Proxy(home, config, port, proc, log)
    try:
        deadline = time.monotonic() + 30
        # serving, and each worker has published its upstream gauges once
        while "stockade_proxy_upstream_up{" not in _try_scrape(proxy):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, f"proxy not ready:\n{log.read_text()}"
            time.sleep(0.1)
        yield proxy
    finally:
        stop(proc)


def _try_scrape(proxy: Proxy) -> str:
    try:
        return proxy.scrape()
    except (OSError, ValueError, KeyError):
        return ""


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        text: str = response.read().decode()
        return text


def get(port: int, path: str, headers: str = "", host: str = "t") -> int:
    """One request on a connection of its own (the kernel may hand it to any worker)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
        sock.sendall(head.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def samples(text: str) -> Samples:
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


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.fail(
            "the observability tests run a real controller (it loads an XDP program): run "
            "them as root, e.g. `sudo make test`",
            pytrace=False,
        )
