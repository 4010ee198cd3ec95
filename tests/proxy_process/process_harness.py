"""Run `stockade proxy run` as a real process (master + workers) on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

STOCKADE = [sys.executable, "-m", "stockade.cli.main"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ProxyProcess:
    proc: subprocess.Popen[bytes]
    log: Path
    port: int

    def workers(self) -> list[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in path.read_text().split()]

    def wait_workers(
        self, count: int, exclude: set[int] = frozenset(), timeout: float = 20
    ) -> list[int]:  # type: ignore[assignment]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = [p for p in self.workers() if p not in exclude]
            if len(pids) >= count:
                return pids
            time.sleep(0.05)
        raise AssertionError(f"{count} workers did not appear:\n{self.log.read_text()}")

    def rss_kib(self, pid: int) -> int:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise AssertionError("no VmRSS")


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"proxy exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"proxy not listening on {port}:\n{log.read_text()}")


UPSTREAM_APP = Path(__file__).with_name("upstream_app.py")


@contextmanager
def running_upstream() -> Iterator[int]:
    """upstream_app.py on a free loopback port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(UPSTREAM_APP), str(port)])
    try:
        wait_listening(port, proc, Path("/dev/null"))
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def running_proxy(config_text: str, tmp: Path, port: int) -> Iterator[ProxyProcess]:
    config = tmp / "stockade.toml"
    config.write_text(config_text.replace("{status_dir}", str(tmp / "status")))
    log = tmp / "proxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*STOCKADE, "--config", str(config), "proxy", "run"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_listening(port, proc, log)
        yield ProxyProcess(proc, log, port)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
