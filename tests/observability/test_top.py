"""`stockade top` against a real controller and proxy: one plain frame, JSON, the live
view on a terminal (q and Ctrl-C leave it and restore the terminal), and the
controller or the proxy away."""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from obs_harness import LIMIT, STOCKADE, Controller, Proxy, get, running_proxy

CLI_JSON_DOC = Path(__file__).parents[2] / "docs" / "cli-json.md"
LOGIN_FAILURES = 3
REFUSED = 2
ALLOWED = 7


@pytest.fixture(scope="module")
def proxy(
    controller: Controller, upstream: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Proxy]:
    """A proxy that has answered known traffic: ALLOWED on `api`, LOGIN_FAILURES 401s on
    `login`, LIMIT + REFUSED on `limited` (REFUSED of them 429)."""
    with running_proxy(tmp_path_factory.mktemp("top"), controller, upstream) as p:
        assert [p.get(f"/x/{i}") for i in range(ALLOWED)] == [200] * ALLOWED
        bad_key = "X-API-Key: stk_nope_nope\r\n"
        assert [p.get("/login", bad_key) for _ in range(LOGIN_FAILURES)] == [401] * 3
        statuses = [p.get("/limited") for _ in range(LIMIT + REFUSED)]
        assert statuses == [200] * LIMIT + [429] * REFUSED
        p.wait_counted()
        yield p


def top(config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STOCKADE, "--config", str(config), "top", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")},
    )


def section(text: str, title: str) -> list[list[str]]:
    """The rows of one table in a plain frame, split on whitespace: a table is its title
    line, a header line and its rows, up to a blank line."""
    lines = [line.rstrip() for line in text.splitlines()]
    rows = []
    for line in lines[lines.index(title) + 2 :]:
        if not line:
            break
        rows.append(line.split())
    return rows


def row(rows: list[list[str]], first: str) -> list[str]:
    (found,) = [r for r in rows if r[0] == first]
    return found


def test_once_prints_one_plain_frame_with_the_counters(ctl: Controller, proxy: Proxy) -> None:
    ctl.api("ban", target="198.18.0.77", ttl="5m", reason="scanner")
    ctl.api("ban", target="fd00:77::/64")
    result = top(proxy.config, "--once", "--interval", "0.2")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "\x1b" not in out  # not a terminal: no escape codes

    reasons = section(out, "kernel: packets by reason")
    assert [r[0] for r in reasons] == [
        *("pass", "allow", "drop_ban", "drop_rate", "malformed", "non_ip")
    ]
    assert row(reasons, "drop_ban")[1] == "drop"
    top_bans = section(out, "bans: top by hits")
    assert {r[0] for r in top_bans} == {"198.18.0.77", "fd00:77::/64"}
    expiring = section(out, "bans: expiring soonest")
    assert [r[0] for r in expiring] == ["198.18.0.77"]
    assert row(expiring, "198.18.0.77")[4] == "in"  # 5m, less the time it took

    routes = section(out, "proxy: requests by route")
    # route, req/s, requests, 2xx, 3xx, 4xx, 5xx, p50, p99
    assert row(routes, "api")[2:7] == [str(ALLOWED), str(ALLOWED), "0", "0", "0"]
    assert row(routes, "login")[2:7] == [str(LOGIN_FAILURES), "0", "0", str(LOGIN_FAILURES), "0"]
    limited = [str(LIMIT + REFUSED), str(LIMIT), "0", str(REFUSED), "0"]
    assert row(routes, "limited")[2:7] == limited
    decisions = section(out, "proxy: requests by decision")
    assert row(decisions, "ratelimit")[2] == str(REFUSED)
    assert row(decisions, "auth")[2] == str(LOGIN_FAILURES)
    assert row(decisions, "allowed")[2] == str(ALLOWED + LIMIT)
    upstreams = section(out, "proxy: upstream servers")
    assert [r[0] for r in upstreams] == ["api"] and upstreams[0][2] == "UP"


def frame_json(config: Path, *args: str) -> dict[str, Any]:
    result = top(config, "--json", *args)
    assert result.returncode == 0, result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def test_json_has_the_same_numbers(ctl: Controller, proxy: Proxy) -> None:
    ctl.api("ban", target="198.18.0.78", ttl="1h")
    frame = frame_json(proxy.config, "--interval", "0.2")
    assert frame["interval"] == pytest.approx(0.2, abs=0.5)
    assert frame["controller"]["bans"] == 1 and frame["controller"]["monitor"] is False
    assert [b["target"] for b in frame["expiring"]] == ["198.18.0.78"]
    assert 3500 < frame["expiring"][0]["expires_in"] <= 3600
    reasons = {r["reason"]: r for r in frame["reasons"]}
    assert reasons["drop_ban"]["verdict"] == "drop" and reasons["pass"]["verdict"] == "pass"
    assert reasons["drop_ban"]["packets_per_second"] == 0.0  # no interface: nothing seen
    p = frame["proxy"]
    routes = {r["route"]: r for r in p["routes"]}
    assert routes["api"]["requests"] == ALLOWED
    assert routes["login"]["statuses"] == {"2xx": 0, "3xx": 0, "4xx": LOGIN_FAILURES, "5xx": 0}
    assert routes["limited"]["statuses"]["4xx"] == REFUSED
    assert p["overall"]["requests"] == ALLOWED + LOGIN_FAILURES + LIMIT + REFUSED
    assert routes["api"]["requests_per_second"] == 0.0  # nothing during the interval
    assert routes["api"]["p50"] is None  # no request in the interval: no latency
    decisions = {d["decision"]: d["requests"] for d in p["decisions"]}
    assert decisions == {"allowed": ALLOWED + LIMIT, "auth": LOGIN_FAILURES, "ratelimit": REFUSED}
    (server,) = p["upstreams"]
    assert server["pool"] == "api" and server["up"] is True and server["in_flight"] == 0
    assert frame["proxy_state"] == "running"
    assert set(frame) | set(p) == documented_fields()


def documented_fields() -> set[str]:
    """Field names in the tables of the docs/cli-json.md section on `stockade top --json`."""
    sections = re.split(r"^## ", CLI_JSON_DOC.read_text(), flags=re.MULTILINE)
    (section,) = [s for s in sections if s.startswith("`stockade top ")]
    return set(re.findall(r"^\| `([a-z_]+)` \|", section, flags=re.MULTILINE))


def test_rates_and_latency_are_over_the_interval(ctl: Controller, proxy: Proxy) -> None:
    """Requests sent while `top` waits between its two samples give a rate and p50/p99."""
    stop = threading.Event()

    def load() -> None:
        for i in range(200):  # bounded: at most 200 requests in 4 s
            if stop.is_set():
                return
            get(proxy.port, f"/load/{i}")
            time.sleep(0.02)

    sender = threading.Thread(target=load)
    sender.start()
    try:
        frame = frame_json(proxy.config, "--interval", "1.5")
    finally:
        stop.set()
        sender.join(timeout=30)
    api = next(r for r in frame["proxy"]["routes"] if r["route"] == "api")
    assert api["requests_per_second"] > 5
    assert api["p50"] is not None and 0 < api["p50"] <= api["p99"] < 1
    assert frame["proxy"]["routes"][0]["route"] == "api"  # the busiest route first


def test_the_controller_down_is_an_error_with_a_hint(tmp_path: Path) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text(f'[controller]\nsocket = "{tmp_path}/control.sock"\n')
    result = top(config, "--once")
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("stockade: the controller is not running")
    assert "stockade controller run" in line


def test_a_proxy_not_running_is_shown_as_such(ctl: Controller, tmp_path: Path) -> None:
    status_dir = tmp_path / "status"
    status_dir.mkdir()
    config = tmp_path / "stockade.toml"
    config.write_text(
        ctl.config.read_text() + f'[proxy]\nstatus_dir = "{status_dir}"\n'
    )
    result = top(config, "--once", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    assert f"proxy: not running (no {status_dir / 'admin.json'})" in result.stdout
    assert "kernel: packets by reason" in result.stdout

    # killed without cleaning up: admin.json names a process that is gone
    gone = subprocess.Popen(["true"])
    gone.wait()
    (status_dir / "admin.json").write_text(
        json.dumps({"address": "127.0.0.1", "port": 9, "pid": gone.pid})
    )
    frame = frame_json(config, "--interval", "0.1")
    assert frame["proxy"] is None
    assert frame["proxy_state"].startswith(f"not running (pid {gone.pid} in ")


# -- the live view, on a pseudo-terminal ---------------------------------------------
ENTER_SCREEN, LEAVE_SCREEN, SHOW_CURSOR = b"\x1b[?1049h", b"\x1b[?1049l", b"\x1b[?25h"


def live_top(config: Path, key: bytes) -> tuple[int, bytes, bool]:
    """Run `stockade top` on a new terminal, press `key` once a frame is drawn.

    Returns the exit code, everything written to the terminal, and whether
    the terminal's modes are what they were before.
    """
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 60, 150, 0, 0))
    before = termios.tcgetattr(slave)
    out = b""
    try:
        # setsid --ctty: the terminal becomes the controlling one, so Ctrl-C is SIGINT
        proc = subprocess.Popen(
            ["setsid", "--ctty", *STOCKADE, "--config", str(config), "top"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env={k: v for k, v in os.environ.items() if not k.startswith("STOCKADE_")},
        )
        deadline = time.monotonic() + 30
        pressed = False
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                out += os.read(master, 65536)
            if not pressed and b"proxy: upstream servers" in out:
                os.write(master, key)
                pressed = True
        if proc.poll() is None:
            proc.kill()  # ours, by PID: it ignored the key
        code = proc.wait(timeout=10)
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
        return code, out, termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


# In a pytest-xdist worker the key never reaches `top` on its pseudo-terminal (the same
# run passes in pytest's own process): make test runs it there, after the parallel part.
@pytest.mark.serial
@pytest.mark.parametrize("key", [b"q", b"\x03"], ids=["q", "ctrl-c"])
def test_the_live_view_leaves_on_a_key_and_restores_the_terminal(
    proxy: Proxy, key: bytes
) -> None:
    code, out, restored = live_top(proxy.config, key)
    assert code == 0, out.decode(errors="replace")[-2000:]
    assert ENTER_SCREEN in out and out.rindex(LEAVE_SCREEN) > out.rindex(ENTER_SCREEN)
    assert out.rindex(SHOW_CURSOR) > out.rindex(ENTER_SCREEN)
    assert b"kernel: packets by reason" in out and b"q quits" in out
    assert restored  # echo and line editing are back
