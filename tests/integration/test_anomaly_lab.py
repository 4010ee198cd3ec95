"""Rules in the proxy escalate to kernel bans: driven from the client namespace.

The controller (XDP on the gateway's interface) and the proxy run in the
gateway namespace; the proxy listens on 198.18.0.1:8080 in front of the
lab's upstream API. A client that scans (distinct 404 paths) is banned by
the rule through the controller's rules socket: its packets are then
dropped by XDP, while another client in the same namespace keeps working.
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

import pytest
from controller_harness import RunningController, running_controller

from stockade.lab.netns_exec import popen_in_netns, python_argv, run_in_netns
from stockade.lab.topology import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

C1, C2, C3 = "198.18.0.10", "198.18.0.11", "198.18.0.12"
GW, PORT = "198.18.0.1", 8080
UP4 = "198.18.1.10"
BAN_TTL = 3

# Runs in the client namespace: scan from SRC (distinct 404 paths, one
# connection each), then probe SRC's TCP connects every 5 ms until one
# fails; print the statuses and how long after the last answer the kernel
# started dropping.
SCAN = """
import json, socket, sys, time
src, gw, port, paths = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
def get(path):
    s = socket.create_connection((gw, port), timeout=2, source_address=(src, 0))
    try:
        s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return int(data.split(b" ", 2)[1]) if data else 0
    finally:
        s.close()
statuses = []
for i in range(paths):
    try:
        statuses.append(get(f"/scan/{time.time_ns()}/{i}"))
    except OSError:
        statuses.append(0)
answered = time.monotonic()
dropped_after = None
deadline = answered + 3
while time.monotonic() < deadline:
    s = socket.socket()
    s.settimeout(0.05)
    s.bind((src, 0))
    try:
        s.connect((gw, port))
    except OSError:
        dropped_after = time.monotonic() - answered
        break
    finally:
        s.close()
    time.sleep(0.005)
print(json.dumps({"statuses": statuses, "dropped_after": dropped_after}))
"""

GET = """
import json, socket, sys
src, gw, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    s = socket.create_connection((gw, port), timeout=1, source_address=(src, 0))
    s.sendall(b"GET /health HTTP/1.1\\r\\nHost: t\\r\\nConnection: close\\r\\n\\r\\n")
    data = s.recv(65536)
    s.close()
    print(json.dumps(int(data.split(b" ", 2)[1])))
except OSError:
    print(json.dumps(0))
"""


def in_client(lab: Lab, script: str, *args: str) -> object:
    result = run_in_netns(
        lab.client_ns, python_argv("-c", script, *args), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def status(lab: Lab, src: str) -> int:
    value = in_client(lab, GET, src, GW, str(PORT))
    assert isinstance(value, int)
    return value


@pytest.fixture
def gateway(lab: Lab, tmp_path: Path) -> Iterator[tuple[RunningController, Path]]:
    with running_controller(tmp_path, lab.gateway_ns, lab.gateway_if, mode="native") as ctl:
        config = tmp_path / "proxy.toml"
        config.write_text(
            f"""
[controller]
socket = "{ctl.socket}"
[proxy]
workers = 2
status_dir = "{tmp_path / "status"}"
[proxy.anomaly]
rules_socket = "{tmp_path / "rules.sock"}"
[[proxy.anomaly.rules]]
name = "scanner"
when = "distinct_404_paths > 8 in 1m"
action = "ban"
duration = "{BAN_TTL}s"
ban_factor = 2.0
ban_max = "1m"
[[proxy.listeners]]
address = "{GW}"
port = {PORT}
[proxy.pools.api]
servers = ["{UP4}:8080"]
[proxy.pools.api.health]
enabled = false
[[proxy.routes]]
pool = "api"
"""
        )
        log = tmp_path / "proxy.log"
        with log.open("wb") as out:
            proxy = popen_in_netns(
                lab.gateway_ns,
                [
                    sys.executable,
                    "-m",
                    "stockade.cli.main",
                    "--config",
                    str(config),
                    "proxy",
                    "run",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and "proxy serving" not in log.read_text():
                assert proxy.poll() is None, log.read_text()
                time.sleep(0.1)
            yield ctl, log
        finally:
            if proxy.poll() is None:
                os.kill(proxy.pid, signal.SIGTERM)
                proxy.wait(timeout=30)


def scan(lab: Lab, src: str) -> dict[str, object]:
    result = in_client(lab, SCAN, src, GW, str(PORT), "9")
    assert isinstance(result, dict)
    return result


def test_a_scanner_is_banned_in_the_kernel_and_a_repeat_offender_for_longer(
    lab: Lab, gateway: tuple[RunningController, Path]
) -> None:
    ctl, log = gateway
    assert status(lab, C1) == 200 and status(lab, C2) == 200
    before = ctl.counters()["drop_ban"]

    first = scan(lab, C1)
    assert first["statuses"] == [404] * 9, first
    assert first["dropped_after"] is not None, log.read_text()  # XDP drops its SYNs
    assert ctl.counters()["drop_ban"] > before
    assert status(lab, C1) == 0
    assert status(lab, C2) == 200  # the well-behaved neighbour is untouched
    (ban,) = ctl.api("bans")
    assert ban["target"] == C1 and ban["source"] == "rule"
    assert ban["expires"] - ban["created"] == pytest.approx(BAN_TTL, abs=0.5)

    time.sleep(BAN_TTL + 2)  # the ban expires (the controller sweeps every second)
    assert status(lab, C1) == 200
    second = scan(lab, C1)
    assert second["dropped_after"] is not None
    (ban,) = ctl.api("bans")
    assert ban["expires"] - ban["created"] == pytest.approx(2 * BAN_TTL, abs=0.5)
    explained = json.loads(ctl.cli("explain", C1, "--json").stdout)
    assert "scanner" in json.dumps(explained)


def test_an_allowlisted_scanner_is_never_banned(
    lab: Lab, gateway: tuple[RunningController, Path]
) -> None:
    ctl, log = gateway
    ctl.cli("allow", "add", C3, "--reason", "monitoring")
    result = scan(lab, C3)
    assert result["dropped_after"] is None
    assert ctl.api("bans") == []
    time.sleep(0.5)
    assert status(lab, C3) == 200  # not denied at L7 either
    assert "allowlisted" in log.read_text()
