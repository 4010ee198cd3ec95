"""Reload under load: a route changes with SIGHUP while wrk runs, and nothing fails.

The proxy runs in the lab's gateway namespace (198.18.0.1:8090) in front of two
upstreams (198.18.1.10:18090 and :18091); wrk runs in the client namespace for a
few seconds with a few connections. Halfway through, the config is rewritten so
that /v2/ goes to the second pool, and the master gets SIGHUP. wrk must see no
socket error and no answer outside 2xx/3xx; afterwards /v2/ reaches the other
pool. Then an invalid config is refused on SIGHUP and the old one keeps serving.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import lab_upstream
import pytest

from stockade.lab.netns_exec import popen_in_netns, python_argv, run_in_netns
from stockade.lab.topology import Lab

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (scripts/bootstrap)"),
]

GATEWAY, PORT, UP4 = "198.18.0.1", 8090, "198.18.1.10"
BLUE, GREEN = 18090, 18091
WRK_SECONDS = 6

FETCH = """
import json, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    print(json.dumps([r.status, json.loads(r.read())["port"]]))
"""


def config_text(tmp_path: Path, v2_pool: str, extra: str = "") -> str:
    return f"""
[proxy]
workers = 2
status_dir = "{tmp_path / "status"}"
metrics_dir = "{tmp_path / "metrics"}"
access_log = "{tmp_path / "access.log"}"
drain_timeout = "10s"
[proxy.admin]
enabled = false
[[proxy.listeners]]
address = "{GATEWAY}"
port = {PORT}
[proxy.pools.blue]
servers = ["{UP4}:{BLUE}"]
[proxy.pools.blue.health]
enabled = false
[proxy.pools.green]
servers = ["{UP4}:{GREEN}"]
[proxy.pools.green.health]
enabled = false
[[proxy.routes]]
name = "v2"
path_prefix = "/v2/"
pool = "{v2_pool}"
[[proxy.routes]]
name = "rest"
path_prefix = "/"
pool = "blue"
{extra}"""


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


def wait_for(condition: str, log: Path, proc: subprocess.Popen[str], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while condition not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {condition!r} in:\n{log.read_text()}"
        time.sleep(0.1)


def reload_result(status_dir: Path, generation: int, timeout: float = 20) -> dict[str, object]:
    path = status_dir / "reload.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result: dict[str, object] = json.loads(path.read_text())
        except (OSError, ValueError):
            result = {}
        if result.get("generation") == generation:
            return result
        time.sleep(0.1)
    raise AssertionError(f"no reload {generation} in {path}")


def sighup(status_dir: Path) -> None:
    pid = json.loads((status_dir / "master.json").read_text())["pid"]
    os.kill(int(pid), signal.SIGHUP)


def fetch(lab: Lab, path: str) -> list[int]:
    result = run_in_netns(
        lab.client_ns,
        python_argv("-c", FETCH, f"http://{GATEWAY}:{PORT}{path}"),
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    answer: list[int] = json.loads(result.stdout)
    return answer


@pytest.fixture
def proxy(lab: Lab, tmp_path: Path) -> Iterator[tuple[Path, Path, subprocess.Popen[str]]]:
    ups = [lab_upstream.start(lab, BLUE), lab_upstream.start(lab, GREEN)]
    config = tmp_path / "stockade.toml"
    config.write_text(config_text(tmp_path, "blue"))
    log = tmp_path / "proxy.log"
    with log.open("wb") as out:
        proc = popen_in_netns(
            lab.gateway_ns,
            python_argv("-m", "stockade.cli.main", "--config", str(config), "proxy", "run"),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for("proxy serving", log, proc)
        yield config, log, proc
    finally:
        stop(proc)
        for up in ups:
            stop(up)


def test_reload_under_load_changes_a_route_and_fails_no_request(
    lab: Lab, tmp_path: Path, proxy: tuple[Path, Path, subprocess.Popen[str]]
) -> None:
    config, log, proc = proxy
    status_dir = tmp_path / "status"
    assert fetch(lab, "/v2/x") == [200, BLUE]

    wrk = popen_in_netns(
        lab.client_ns,
        ["wrk", "-t2", "-c8", f"-d{WRK_SECONDS}s", "--latency", f"http://{GATEWAY}:{PORT}/v2/x"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(WRK_SECONDS / 3)
        config.write_text(config_text(tmp_path, "green"))  # /v2/ moves to the other pool
        sighup(status_dir)
        assert reload_result(status_dir, 1)["ok"] is True
        report, _ = wrk.communicate(timeout=WRK_SECONDS + 30)
    finally:
        stop(wrk)
    assert wrk.returncode == 0, report
    requests = re.search(r"(\d+) requests in", report)
    assert requests is not None and int(requests.group(1)) > 100, report
    assert "Socket errors" not in report, report  # connect, read, write or timeout
    assert "Non-2xx or 3xx responses" not in report, report
    assert "config reloaded" in log.read_text()

    assert fetch(lab, "/v2/x") == [200, GREEN]  # the changed route took effect
    assert fetch(lab, "/other") == [200, BLUE]
    # the requests during the run went to both pools: the switch happened under load
    lines = (tmp_path / "access.log").read_text().splitlines()
    ports = {json.loads(line).get("upstream") for line in lines}
    assert len(ports - {None}) == 2, ports
    assert proc.poll() is None


def test_an_invalid_config_on_reload_is_refused_and_the_old_one_serves(
    lab: Lab, tmp_path: Path, proxy: tuple[Path, Path, subprocess.Popen[str]]
) -> None:
    config, log, proc = proxy
    status_dir = tmp_path / "status"
    config.write_text(config_text(tmp_path, "no-such-pool"))
    sighup(status_dir)
    result = reload_result(status_dir, 1)
    assert result["ok"] is False
    assert "unknown pool 'no-such-pool'" in str(result["error"])
    wait_for("reload refused, the running config stays", log, proc)
    assert fetch(lab, "/v2/x") == [200, BLUE]

    config.write_text(config_text(tmp_path, "green", extra='path_prefx = "/x/"\n'))
    sighup(status_dir)
    result = reload_result(status_dir, 2)
    assert result["ok"] is False and "did you mean" in str(result["error"]), result
    assert fetch(lab, "/v2/x") == [200, BLUE]
    assert proc.poll() is None
