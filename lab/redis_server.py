"""A throwaway redis-server for tests, the lab and benchmarks (Debian's `redis-server`).

It listens on a unix socket in its own directory (a path works from every
network namespace, so nodes in lab namespaces share it) and, when asked, on
a loopback TCP port. Nothing is saved to disk (`--save ""`, no AOF): a
restart comes back empty, as a Redis without persistence would. Stopped by
its PID, always.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REDIS_SERVER = "redis-server"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class RedisServerError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _reply_line(sock: socket.socket, limit: int = 512) -> bytes:
    """One RESP reply line, through its CRLF (one recv may return only part of it)."""
    data = b""
    while not data.endswith(b"\r\n") and len(data) < limit:
        chunk = sock.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data


@dataclass
class RedisServer:
    directory: Path
    password: str | None = None
    port: int = 0  # 0: the unix socket only
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def socket_path(self) -> Path:
        return self.directory / "redis.sock"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def url(self, password: str | None = None, tcp: bool = False) -> str:
        """A url for [cluster] url; `password` overrides the server's (to test a wrong one)."""
        secret = self.password if password is None else password
        auth = f":{secret}@" if secret else ""
        if tcp:
            return f"redis://{auth}127.0.0.1:{self.port}/0"
        query = f"?password={secret}" if secret else ""
        return f"unix://{self.socket_path}{query}"

    def argv(self) -> list[str]:
        args = [
            REDIS_SERVER,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--unixsocket",
            str(self.socket_path),
            "--unixsocketperm",
            "700",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--logfile",
            str(self.log_path),
            "--daemonize",
            "no",
        ]
        if self.password:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> None:
        if shutil.which(REDIS_SERVER) is None:
            raise RedisServerError("redis-server is not installed; run ./scripts/bootstrap")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        self.proc = subprocess.Popen(
            self.argv(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RedisServerError(f"redis-server exited: {self.log_tail()}")
            if self._answers():
                return
            time.sleep(0.02)
        self.stop()
        raise RedisServerError(f"redis-server did not answer in {START_TIMEOUT}s")

    def _answers(self) -> bool:
        """PING over the unix socket (with AUTH when a password is set)."""
        if not self.socket_path.exists():
            return False
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                if self.password:
                    sock.sendall(_command("AUTH", self.password))
                    if _reply_line(sock) != b"+OK\r\n":
                        return False
                sock.sendall(_command("PING"))
                return _reply_line(sock) == b"+PONG\r\n"
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop our redis-server (by its PID); SIGKILL after STOP_TIMEOUT."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT)
        self.proc = None

    def kill(self) -> None:
        """As a crash would: SIGKILL, nothing saved."""
        self.stop(signal.SIGKILL)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


@contextmanager
def running_redis(
    directory: Path, password: str | None = None, tcp: bool = False
) -> Iterator[RedisServer]:
    """A redis-server in `directory` for the length of the block (stopped also on failure)."""
    server = RedisServer(directory, password, free_port() if tcp else 0)
    try:
        server.start()
        yield server
    finally:
        server.stop()
