"""Client side of the control API: one request, one reply, over the unix socket.

Shared by the CLI and the proxy's status page (which must not import the
CLI); `stockade.cli.client` adds what only the CLI needs.
"""

from __future__ import annotations

import errno
import json
import socket
from pathlib import Path
from typing import Any

from stockade.protocol import RUNTIME, CommandError, request

TIMEOUT = 10.0
START_HINT = "start it with `systemctl start stockade-controller` or `stockade controller run`"


class ControllerUnavailable(CommandError):
    def __init__(self, message: str, hint: str | None = START_HINT) -> None:
        super().__init__(RUNTIME, message, hint)


def call(socket_path: Path, command: str, *, timeout: float = TIMEOUT, **args: Any) -> Any:
    """Send one command; returns its result or raises CommandError.

    `timeout` bounds the connect and each read (no command takes an
    argument of that name).
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
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
            f"the controller at {socket_path} did not answer within {timeout:g}s",
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
