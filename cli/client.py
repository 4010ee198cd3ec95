"""Client side of the control API: one request, one reply, over the unix socket."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from stockade.protocol import RUNTIME, CommandError, request

TIMEOUT = 10.0
START_HINT = "start it with `systemctl start stockade-controller` or `stockade controller run`"


class ControllerUnavailable(CommandError):
    def __init__(self, message: str, hint: str | None = START_HINT) -> None:
        super().__init__(RUNTIME, message, hint)


def call(socket_path: Path, command: str, **args: Any) -> Any:
    """Send one command; returns its result or raises CommandError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        try:
            sock.connect(str(socket_path))
        except FileNotFoundError:
            raise ControllerUnavailable(
                f"the controller is not running (no socket at {socket_path})"
            ) from None
        except ConnectionRefusedError:
            raise ControllerUnavailable(
                f"the controller is not running (nothing listens on {socket_path})"
            ) from None
        except PermissionError:
            raise ControllerUnavailable(
                f"permission denied on {socket_path}", "the control socket is root-only: use sudo"
            ) from None
        except OSError as exc:
            if exc.errno == errno.ENOTSOCK:
                raise ControllerUnavailable(f"{socket_path} is not a socket") from None
            raise ControllerUnavailable(
                f"cannot reach the controller at {socket_path}: {exc}"
            ) from None
        sock.sendall(request(command, **args))
        reply = _read_line(sock, socket_path)
    except TimeoutError:
        raise ControllerUnavailable(
            f"the controller at {socket_path} did not answer within {TIMEOUT:.0f}s",
            "check `journalctl -u stockade-controller`",
        ) from None
    finally:
        sock.close()
    try:
        message = json.loads(reply)
    except json.JSONDecodeError:
        raise ControllerUnavailable("the controller sent an invalid reply", None) from None
    if message.get("ok") is True:
        return message.get("result")
    raise CommandError.from_wire(message.get("error") or {})


def _read_line(sock: socket.socket, socket_path: Path) -> bytes:
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        if chunk.endswith(b"\n"):
            break
    data = b"".join(chunks)
    if not data:
        raise ControllerUnavailable(f"the controller closed {socket_path} without answering", None)
    return data


def wait_until_serving(socket_path: Path, process: subprocess.Popen[Any], timeout: float) -> None:
    """Poll until a controller we started answers `status`.

    Raises ControllerUnavailable if the process exits first or the time runs
    out (the caller owns the process and decides what to do with it).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ControllerUnavailable(
                f"the controller exited with {process.returncode} while starting", None
            )
        try:
            call(socket_path, "status")
            return
        except ControllerUnavailable:
            time.sleep(0.05)  # polling for readiness, not waiting out a window
    raise ControllerUnavailable(f"the controller did not serve {socket_path} within {timeout:.0f}s")
