"""The proxy as operators run it: master + workers, signals, memory, privileges."""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from process_harness import STOCKADE, free_port, running_proxy, running_upstream, wait_listening


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    with running_upstream() as port:
        yield port


def config(port: int, upstream: int, workers: int = 2, extra: str = "", listener: str = "") -> str:
    return f"""
[controller]
socket = "/nonexistent/stockade-test/control.sock"
[proxy]
metrics_dir = "{{status_dir}}/metrics"
workers = {workers}
drain_timeout = "10s"
status_dir = "{{status_dir}}"
{extra}
[proxy.admin]
port = 0
[[proxy.listeners]]
address = "127.0.0.1"
port = {port}
{listener}
[proxy.pools.api]
servers = ["127.0.0.1:{upstream}"]
[proxy.pools.api.health]
enabled = false
[[proxy.routes]]
pool = "api"
"""


def http_get(port: int, path: str, timeout: float = 10) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def test_a_killed_worker_is_replaced(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    with running_proxy(config(port, upstream), tmp_path, port) as proxy:
        before = proxy.wait_workers(2)
        os.kill(before[0], signal.SIGKILL)
        after = proxy.wait_workers(1, exclude=set(before))
        assert after and before[0] not in proxy.workers()
        assert len(proxy.wait_workers(2)) == 2
        for _ in range(10):
            assert http_get(port, "/x")[0] == 200


def test_sigterm_drains_an_in_flight_request(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    with running_proxy(config(port, upstream, workers=1), tmp_path, port) as proxy:
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(http_get(port, "/slow")[0]))
        thread.start()
        time.sleep(0.5)  # the request is now waiting on the upstream
        os.kill(proxy.proc.pid, signal.SIGTERM)
        thread.join(timeout=20)
        assert result == [200]
        assert proxy.proc.wait(timeout=20) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_upload_of_1gib_streams_in_bounded_memory(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    with running_proxy(
        config(port, upstream, workers=1).replace(
            'pool = "api"', 'pool = "api"\nmax_body_size = "2GiB"'
        ),
        tmp_path,
        port,
    ) as proxy:
        (worker,) = proxy.wait_workers(1)
        http_get(port, "/warm")
        before = proxy.rss_kib(worker)
        size = 1 << 30
        block = b"x" * (1 << 20)
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(
                f"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            peak = before
            for i in range(size // len(block)):
                sock.sendall(block)
                if i % 64 == 0:
                    peak = max(peak, proxy.rss_kib(worker))
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        assert b" 200 " in data.split(b"\r\n", 1)[0]
        assert b'"body_size": 1073741824' in data
        assert peak - before < 64 * 1024, f"worker RSS grew by {peak - before} KiB"


def test_download_of_1gib_streams_in_bounded_memory(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    with running_proxy(config(port, upstream, workers=1), tmp_path, port) as proxy:
        (worker,) = proxy.wait_workers(1)
        http_get(port, "/warm")
        before = proxy.rss_kib(worker)
        size = 1 << 30
        received = 0
        peak = before
        with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
            sock.sendall(
                f"GET /bytes/{size} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode()
            )
            head = b""
            while b"\r\n\r\n" not in head:
                head += sock.recv(65536)
            head, _, rest = head.partition(b"\r\n\r\n")
            received = len(rest)
            reads = 0
            while chunk := sock.recv(1 << 20):
                received += len(chunk)
                reads += 1
                if reads < 300:
                    # a slow reader first: without back-pressure the gateway
                    # would buffer what the faster upstream sends meanwhile
                    time.sleep(0.005)
                if reads % 16 == 0:
                    peak = max(peak, proxy.rss_kib(worker))
        assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {size}".encode() in head
        assert received == size
        assert peak - before < 64 * 1024, f"worker RSS grew by {peak - before} KiB"


def test_refuses_to_start_with_the_pure_python_parser(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    path = tmp_path / "stockade.toml"
    path.write_text(config(port, upstream, workers=1).replace("{status_dir}", str(tmp_path)))
    result = subprocess.run(
        [*STOCKADE, "--config", str(path), "proxy", "run"],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"},
    )
    assert result.returncode == 1
    assert "C HTTP parser" in result.stderr


def test_bad_certificate_is_a_clear_error_at_start(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    path = tmp_path / "stockade.toml"
    missing = tmp_path / "missing.pem"
    path.write_text(
        config(
            port,
            upstream,
            workers=1,
            listener=f'certificates = [{{ cert = "{missing}", key = "{missing}" }}]',
        ).replace("{status_dir}", str(tmp_path))
    )
    result = subprocess.run(
        [*STOCKADE, "--config", str(path), "proxy", "run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr


def test_sighup_reloads_the_certificate(tmp_path: Path, upstream: int) -> None:
    ca = trustme.CA()
    first = ca.issue_cert("api.test")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    first.cert_chain_pems[0].write_to_path(str(cert))
    first.private_key_pem.write_to_path(str(key))
    port = free_port()
    listener = f'certificates = [{{ cert = "{cert}", key = "{key}" }}]'
    with running_proxy(
        config(port, upstream, workers=2, listener=listener), tmp_path, port
    ) as proxy:
        proxy.wait_workers(2)
        ctx = ssl.create_default_context()
        ca.configure_trust(ctx)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with ctx.wrap_socket(raw, server_hostname="api.test") as tls:
                old_serial = tls.getpeercert()["serialNumber"]  # type: ignore[index]
        second = ca.issue_cert("api.test")
        second.cert_chain_pems[0].write_to_path(str(cert))
        second.private_key_pem.write_to_path(str(key))
        os.kill(proxy.proc.pid, signal.SIGHUP)
        deadline = time.monotonic() + 10
        serials = set()
        while time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
                with ctx.wrap_socket(raw, server_hostname="api.test") as tls:
                    serials.add(tls.getpeercert()["serialNumber"])  # type: ignore[index]
            if len(serials) == 1 and old_serial not in serials:
                break
            serials.clear()
            time.sleep(0.1)
        assert serials and old_serial not in serials
        assert "reloaded" in proxy.log.read_text()


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError("no Uid")


def test_workers_drop_privileges(tmp_path: Path, upstream: int) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    port = free_port()
    with running_proxy(
        config(port, upstream, workers=1, extra='user = "nobody"'), tmp_path, port
    ) as proxy:
        (worker,) = proxy.wait_workers(1)
        # The worker drops privileges before it serves; checked right after fork it may
        # still be root, so let it answer a request first.
        assert http_get(port, "/x")[0] == 200
        assert _uid(worker) == nobody
        assert _uid(proxy.proc.pid) == 0


def test_status_shows_pool_health_from_the_workers(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    text = config(port, upstream, workers=2)
    with running_proxy(text, tmp_path, port) as proxy:
        proxy.wait_workers(2)
        http_get(port, "/x")
        expected = f"pool api: 127.0.0.1:{upstream} UP, 1 requests"
        deadline = time.monotonic() + 10
        while True:  # workers publish once a second
            result = subprocess.run(
                [*STOCKADE, "--config", str(tmp_path / "stockade.toml"), "status"],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if expected in result.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        # the controller is not running here: exit 1, but the proxy part is shown
        assert result.returncode == 1
        assert "controller is not running" in result.stderr
        assert "proxy:      2 workers" in result.stdout
        assert expected in result.stdout
    assert not list((tmp_path / "status").glob("*.json"))  # workers remove theirs on exit


def test_http_listener_redirects_to_https(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    text = config(port, upstream, workers=1, listener="redirect_to_https = 8443")
    with running_proxy(text, tmp_path, port):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"GET /a/b?c=1 HTTP/1.1\r\nHost: api.test:8080\r\nConnection: close\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    head = data.split(b"\r\n\r\n", 1)[0].decode()
    assert head.startswith("HTTP/1.1 308")
    assert "Location: https://api.test:8443/a/b?c=1" in head


def test_run_starts_controller_and_proxy_and_stops_both(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    pin_root = Path(f"/sys/fs/bpf/stockade-runtest-{os.getpid()}")
    text = config(port, upstream, workers=1).replace(
        '[controller]\nsocket = "/nonexistent/stockade-test/control.sock"',
        f'[controller]\nsocket = "{tmp_path}/control.sock"\nstate_dir = "{tmp_path}/state"\n'
        f'pin_root = "{pin_root}"\n[xdp]\nmax_bans_v4 = 64\nmax_bans_v6 = 64',
    )
    path = tmp_path / "stockade.toml"
    path.write_text(text.replace("{status_dir}", str(tmp_path / "status")))
    log = tmp_path / "run.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*STOCKADE, "--config", str(path), "run"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_listening(port, proc, log)
        deadline = time.monotonic() + 30
        while not (tmp_path / "control.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (tmp_path / "control.sock").exists(), log.read_text()
        assert http_get(port, "/x")[0] == 200
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log.read_text()
        assert not (tmp_path / "control.sock").exists()  # the controller stopped too
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        subprocess.run(
            [*STOCKADE, "--config", str(path), "detach", "--remove-maps"],
            capture_output=True,
            timeout=60,
        )
        import shutil

        shutil.rmtree(pin_root, ignore_errors=True)


def test_a_missing_api_keys_file_stops_the_proxy_at_start(tmp_path: Path, upstream: int) -> None:
    port = free_port()
    missing = tmp_path / "keys.toml"
    text = config(port, upstream, workers=1).replace(
        "[[proxy.listeners]]", f'[proxy.auth]\napi_keys_file = "{missing}"\n[[proxy.listeners]]', 1
    )
    path = tmp_path / "stockade.toml"
    path.write_text(text.replace("{status_dir}", str(tmp_path)))
    result = subprocess.run(
        [*STOCKADE, "--config", str(path), "proxy", "run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert str(missing) in result.stderr
