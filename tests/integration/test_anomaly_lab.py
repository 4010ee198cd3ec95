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
from typing import Any

import pytest
from controller_harness import RunningController, running_controller

from stockade.lab.netns_exec import popen_in_netns, python_argv, run_in_netns
from stockade.lab.topology import Lab

pytestmark = [pytest.mark.kernel, pytest.mark.netns]

C1, C2, C3 = "198.18.0.10", "198.18.0.11", "198.18.0.12"
GW, PORT = "198.18.0.1", 8080
UP4 = "198.18.1.10"
BAN_TTL = 3

# Runs in the client namespace: send REQUESTS (a JSON list of [path, headers])
# from SRC, one connection each, until one fails; then probe SRC's TCP connects every 5 ms until
# one fails; print the statuses and how long after the last answer the kernel
# started dropping (null: it never did within 3 s).
BEHAVE = """
import json, socket, sys, time
src, gw, port, requests = sys.argv[1], sys.argv[2], int(sys.argv[3]), json.loads(sys.argv[4])
def get(path, headers):
    s = socket.create_connection((gw, port), timeout=2, source_address=(src, 0))
    try:
        extra = "".join(f"{k}: {v}\\r\\n" for k, v in headers.items())
        head = f"GET {path} HTTP/1.1\\r\\nHost: t\\r\\n{extra}Connection: close\\r\\n\\r\\n"
        s.sendall(head.encode())
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
for path, headers in requests:
    try:
        statuses.append(get(path, headers))
    except OSError:
        statuses.append(0)
    if statuses[-1] == 0:
        break  # closed or dropped: the rule has acted
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
def gateway(
    lab: Lab, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[RunningController, Path]]:
    extra_rule = getattr(request, "param", "")
    rule_table = (
        f'[[proxy.anomaly.rules]]\n{extra_rule}\naction = "ban"\nduration = "{BAN_TTL}s"'
        if extra_rule
        else ""
    )
    with running_controller(tmp_path, lab.gateway_ns, lab.gateway_if, mode="native") as ctl:
        config = tmp_path / "proxy.toml"
        config.write_text(
            f"""
[controller]
socket = "{ctl.socket}"
[proxy]
metrics_dir = "{tmp_path / 'metrics'}"
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
{rule_table}
[proxy.admin]
port = 0
[[proxy.listeners]]
address = "{GW}"
port = {PORT}
[proxy.pools.api]
servers = ["{UP4}:8080"]
[proxy.pools.api.health]
enabled = false
[[proxy.routes]]
pool = "api"
[[proxy.routes]]
name = "login"
path_prefix = "/login"
pool = "api"
auth = "api_key"
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


def behave(lab: Lab, src: str, requests: list[tuple[str, dict[str, str]]]) -> dict[str, Any]:
    result = in_client(lab, BEHAVE, src, GW, str(PORT), json.dumps(requests))
    assert isinstance(result, dict)
    return result


def scan(lab: Lab, src: str) -> dict[str, Any]:
    return behave(lab, src, [(f"/scan/{time.time_ns()}/{i}", {}) for i in range(9)])


BAD_KEY = {"X-API-Key": "stk_nope_nope"}
# (rule, what the client does, what it gets answered): each trips its rule and
# nothing else; the scanner's rule is in every config (see `gateway`).
SCENARIOS = {
    "brute_force": (
        'name = "brute"\nwhen = "auth_failures_same_path > 5 in 1m"',
        [("/login", BAD_KEY)] * 6,
        [401] * 6,
    ),
    "error_ratio": (
        'name = "errors"\nwhen = "err_ratio > 0.5 with requests > 10 in 1m"',
        [("/health", {})] * 2 + [("/nope", {})] * 9,
        [200] * 2 + [404] * 9,
    ),
    "scraping": (  # the rule trips somewhere in the run (at 1500 bytes of bodies)
        'name = "scraper"\nwhen = "bytes_out > 1500 in 1m"',
        [("/api/hello", {})] * 100,
        [200] * 100,
    ),
}


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


@pytest.mark.parametrize(
    ("gateway", "scenario"),
    [(rule, name) for name, (rule, _, _) in SCENARIOS.items()],
    indirect=["gateway"],
    ids=list(SCENARIOS),
)
def test_misbehaviour_ends_in_a_kernel_ban_and_spares_the_neighbour(
    lab: Lab, gateway: tuple[RunningController, Path], scenario: str
) -> None:
    ctl, log = gateway
    _, requests, answers = SCENARIOS[scenario]
    before = ctl.counters()["drop_ban"]
    result = behave(lab, C1, requests)
    statuses = result["statuses"]
    if scenario == "scraping":  # answered until the bytes added up, then cut off
        assert statuses[-1] == 0 and 20 < len(statuses) < 100, result
        assert set(statuses[:-1]) == {200}, result
    else:  # the last request trips the rule
        assert statuses == answers, result
    assert result["dropped_after"] is not None, log.read_text()
    assert ctl.counters()["drop_ban"] > before
    (ban,) = ctl.api("bans")
    assert (ban["target"], ban["source"]) == (C1, "rule")
    assert status(lab, C2) == 200
