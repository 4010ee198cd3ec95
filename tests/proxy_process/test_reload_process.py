"""The proxy's reload (`stockade reload`, SIGHUP): new config, no dropped request."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from process_harness import STOCKADE, free_port, running_proxy, running_upstream
from test_ratelimit_workers import proxy_config, status_of

LIMIT = """
[proxy.rate_limiting.limits.per_ip]
rate = "3/min"
all_routes = true
"""


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with running_upstream() as port:
        yield port


def reload(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STOCKADE, "--config", str(tmp_path / "stockade.toml"), "reload"],
        capture_output=True,
        text=True,
        timeout=60,
    )


def keepalive_get(sock: socket.socket, path: str = "/x") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += sock.recv(65536)
    return head


def test_reload_applies_the_new_config_without_dropping_requests(
    tmp_path: Path, upstream: int
) -> None:
    port = free_port()
    with running_proxy(proxy_config(port, upstream, 2, "", ""), tmp_path, port) as proxy:
        old_workers = set(proxy.wait_workers(2))
        assert [status_of(port) for _ in range(5)] == [200] * 5  # no limit yet

        # an idle keep-alive connection and a request in flight, across the reload
        idle = socket.create_connection(("127.0.0.1", port), timeout=10)
        assert b" 200 " in keepalive_get(idle)
        slow: list[int] = []
        slow_thread = threading.Thread(target=lambda: slow.append(status_of(port, path="/slow")))
        slow_thread.start()
        time.sleep(0.3)

        config = tmp_path / "stockade.toml"
        config.write_text(config.read_text().replace("[proxy.admin]", LIMIT + "[proxy.admin]"))
        result = reload(tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "proxy:      reloaded" in result.stdout

        slow_thread.join(timeout=30)
        assert slow == [200]  # the old worker finished it
        # the idle connection is answered once more, told to close, not cut
        head = keepalive_get(idle)
        assert b" 200 " in head and b"connection: close" in head.lower()
        idle.close()
        statuses = [status_of(port) for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]  # the new limit holds
        new_workers = set(proxy.wait_workers(2, exclude=old_workers))
        assert not new_workers & old_workers

        # a broken config is refused and the running one stays
        config.write_text(config.read_text().replace('rate = "3/min"', 'rate = "lots"'))
        refused = reload(tmp_path)  # the CLI reads the file first and refuses it itself
        assert refused.returncode == 2 and "invalid rate" in refused.stderr
        os.kill(proxy.proc.pid, signal.SIGHUP)  # and so does the master
        deadline = time.monotonic() + 10
        while "reload refused" not in proxy.log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "reload refused, the running config stays" in proxy.log.read_text()
        assert status_of(port) == 429
        assert set(proxy.workers()) == new_workers
