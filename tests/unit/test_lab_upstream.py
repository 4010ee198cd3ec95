"""The lab's upstream API and probes, on loopback (no namespaces needed)."""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from stockade.lab import probe
from stockade.lab.upstream import DualStackServer, Handler, make_server, peer_address


@pytest.fixture(params=["127.0.0.1", "::1"])
def server(request: pytest.FixtureRequest) -> Iterator[tuple[str, int]]:
    srv = make_server(request.param, 0)
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield request.param, srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        thread.join(5)


def _request(host: str, port: int, method: str, path: str) -> tuple[int, dict[str, object]]:
    conn = http.client.HTTPConnection(host, port, timeout=2)
    try:
        conn.request(method, path, body=b"x" if method == "POST" else None)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_health_and_hello(server: tuple[str, int]) -> None:
    host, port = server
    assert _request(host, port, "GET", "/health") == (200, {"ok": True})
    assert _request(host, port, "GET", "/api/hello?x=1") == (
        200,
        {"hello": "world", "client": host},
    )


@pytest.mark.parametrize(("method", "path"), [("GET", "/"), ("GET", "/api"), ("POST", "/health")])
def test_anything_else_is_a_json_404(server: tuple[str, int], method: str, path: str) -> None:
    status, body = _request(*server, method, path)
    assert status == 404
    assert body["error"] == "not found"


def test_keep_alive_serves_several_requests_on_one_connection(server: tuple[str, int]) -> None:
    conn = http.client.HTTPConnection(*server, timeout=2)
    try:
        for _ in range(3):
            conn.request("GET", "/health")
            response = conn.getresponse()
            assert response.status == 200
            response.read()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("::ffff:198.18.0.10", "198.18.0.10"),
        ("fd00:18:0::10", "fd00:18::10"),
        ("198.18.0.11", "198.18.0.11"),
        ("fe80::1%c0", "fe80::1"),
        ("not-an-address", "not-an-address"),
    ],
)
def test_peer_address(raw: str, shown: str) -> None:
    assert peer_address(raw) == shown


def test_the_dual_stack_server_is_v6_with_v4_mapped() -> None:
    assert DualStackServer.address_family.name == "AF_INET6"
    assert Handler.protocol_version == "HTTP/1.1"


def test_the_process_reports_ready_and_exits_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "stockade.lab.upstream", "--host", "127.0.0.1", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = proc.stdout.readline().split()
        assert ready[0] == "ready"
        result = probe.http_get(f"http://127.0.0.1:{ready[1]}/health")
        assert result["ok"] and result["body"] == {"ok": True}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def test_probes_report_refused_and_open_on_loopback() -> None:
    srv = make_server("127.0.0.1", 0)
    port = srv.server_address[1]
    try:
        assert probe.tcp_connect("127.0.0.1", port, src="127.0.0.1")["result"] == "open"
    finally:
        srv.server_close()
    assert probe.tcp_connect("127.0.0.1", port, timeout=0.5)["result"] == "refused"


def test_http_probe_refuses_other_schemes() -> None:
    with pytest.raises(ValueError, match="only http"):
        probe.http_get("https://127.0.0.1/")
