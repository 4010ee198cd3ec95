"""The real proxy with `log_format = "json"`: every line its master and workers write is a
JSON object with the common fields, a WAF block's line carries the request id its access
log line has, nothing secret is written; and its status page says the controller is away
while still showing the requests."""

from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from process_harness import free_port, running_proxy, running_upstream
from test_ratelimit_workers import proxy_config, status_of

RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
TOKEN = "Bearer s3cr3t-t0ken-value"  # sent by a client: must appear in no log
WORKERS = 2


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with running_upstream() as port:
        yield port


def lines(path: Path) -> list[dict[str, Any]]:
    text = path.read_text()
    assert "s3cr3t-t0ken-value" not in text
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_json_logs_from_master_and_workers(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    access = tmp_path / "access.log"
    extra = f'log_format = "json"\naccess_log = "{access}"'
    text = proxy_config(port, upstream, WORKERS, extra, 'name = "api"\nwaf = "sqli_xss"')
    with running_proxy(text, tmp_path, port) as proxy:
        workers = proxy.wait_workers(WORKERS)
        assert status_of(port, f"Authorization: {TOKEN}\r\n", "/x?q=hello") == 200
        assert (
            status_of(port, f"Authorization: {TOKEN}\r\n", "/x?id=1%27%20OR%20%271%27%3D%271")
            == 403
        )
        master = proxy.proc.pid
        os.kill(master, signal.SIGTERM)  # stopped here: the workers flush their access logs
        proxy.proc.wait(timeout=30)

    logged = lines(proxy.log)  # stdout and stderr of master and workers
    assert logged, "nothing logged"
    for line in logged:  # every line: one object, the common fields first
        assert list(line)[:5] == ["time", "level", "logger", "message", "pid"], line
        assert RFC3339.fullmatch(line["time"]) and line["level"] in ("info", "warning")
    assert {line["pid"] for line in logged} <= {master, *workers}
    serving = [line for line in logged if line["message"].startswith("proxy serving")]
    assert [line["pid"] for line in serving] == [master]
    assert any(line["message"] == "proxy stopped" for line in logged)

    (block,) = [line for line in logged if line["message"].startswith("waf blocked")]
    assert block["logger"] == "stockade.proxy.waf" and block["pid"] in workers
    assert (block["route"], block["client_ip"], block["waf_mode"]) == (
        "api",
        "127.0.0.1",
        "sqli_xss",
    )
    assert block["rules"] and block["path"] == "/x"

    # the access log names the same things the same way: one request id in both logs
    requests = lines(access)
    # two workers, each flushing its own buffer: the lines' order is not the requests'
    assert sorted(r["status"] for r in requests) == [200, 403]
    (refused,) = [r for r in requests if r["status"] == 403]
    assert refused["request_id"] == block["request_id"] and refused["pid"] == block["pid"]
    assert refused["logger"] == "stockade.access" and RFC3339.fullmatch(refused["time"])


def test_the_status_page_without_a_controller(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    with running_proxy(
        proxy_config(port, upstream, 1, "", 'name = "api"'), tmp_path, port
    ) as proxy:
        proxy.wait_workers(1)
        assert [status_of(port) for _ in range(3)] == [200] * 3
        admin = json.loads((tmp_path / "status" / "admin.json").read_text())
        url = f"http://{admin['address']}:{admin['port']}/status"
        # the route's row: its rate ("-" on a first look), then 3 requests
        row = re.compile(r'<td>api</td><td class="num">[-0-9.]+</td><td class="num">3</td>')
        deadline = time.monotonic() + 10
        while True:  # the worker moves its counts into the metrics once a second
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.headers["Content-Type"] == "text/html; charset=utf-8"
                page = response.read().decode()
            if row.search(page) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    # the test config names a socket nobody serves
    assert (
        '<p id="controller" class="down">controller: the controller is not running '
        "(no socket at /nonexistent/stockade-test/control.sock)"
    ) in page
    assert row.search(page), page
