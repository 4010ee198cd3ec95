"""Client side of the control API: one request, one reply, over the unix socket.

Shared by the CLI and the proxy's status page (which must not import the
CLI); `stockade.cli.client` adds what only the CLI needs.
"""

from __future__ import annotations

import errno
import json
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stockade.protocol import BAD_INPUT, MAX_LINE, RUNTIME, CommandError, request

TIMEOUT = 10.0
COMMIT_TIMEOUT = 300.0  # a batch's commit writes the store and the maps: give it time
MAX_REPLY = 256 * 1024 * 1024  # bytes of one reply line (a `bans` of 1M entries fits)
START_HINT = "start it with `systemctl start stockade-controller` or `stockade controller run`"


class ControllerUnavailable(CommandError):
    def __init__(self, message: str, hint: str | None = START_HINT) -> None:
        super().__init__(RUNTIME, message, hint)


def _connect(socket_path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(socket_path))
    except FileNotFoundError:
        sock.close()
        raise ControllerUnavailable(
            f"the controller is not running (no socket at {socket_path})"
        ) from None
    except ConnectionRefusedError:
        sock.close()
        raise ControllerUnavailable(
            f"the controller is not running (nothing listens on {socket_path})"
        ) from None
    except PermissionError:  # the socket (0600) or its directory: not for this user
        sock.close()
        raise ControllerUnavailable(
            f"permission denied on {socket_path}", "run as root (the control socket is root-only)"
        ) from None
    except TimeoutError:
        sock.close()
        raise
    except OSError as exc:
        sock.close()
        if exc.errno == errno.ENOTSOCK:
            raise ControllerUnavailable(f"{socket_path} is not a socket") from None
        raise ControllerUnavailable(
            f"cannot reach the controller at {socket_path}: {exc}"
        ) from None
    return sock


def _unavailable_on_timeout(socket_path: Path, timeout: float) -> ControllerUnavailable:
    return ControllerUnavailable(
        f"the controller at {socket_path} did not answer within {timeout:g}s",
        "check `journalctl -u stockade-controller`",
    )


def _result(reply: bytes) -> Any:
    try:
        message = json.loads(reply)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ControllerUnavailable("the controller sent an invalid reply", None) from None
    if not isinstance(message, dict):
        raise ControllerUnavailable("the controller sent an invalid reply", None)
    if message.get("ok") is True:
        return message.get("result")
    error = message.get("error")
    raise CommandError.from_wire(error if isinstance(error, dict) else {})


def call(socket_path: Path, command: str, *, timeout: float = TIMEOUT, **args: Any) -> Any:
    """Send one command; returns its result or raises CommandError.

    `timeout` bounds the connect and each read (no command takes an
    argument of that name).
    """
    try:
        sock = _connect(socket_path, timeout)
        try:
            sock.sendall(request(command, **args))
            reply = _read_line(sock, socket_path)
        finally:
            sock.close()
    except TimeoutError:
        raise _unavailable_on_timeout(socket_path, timeout) from None
    return _result(reply)


def batch_lines(
    command: str, entries: Sequence[dict[str, Any]], limit: int = MAX_LINE, **args: Any
) -> list[tuple[int, bytes]]:
    """The request lines of a batch: chunks of whole entries, each line under `limit`
    bytes, the last with commit and `args`; with each, how many entries are sent by then.

    Each entry is encoded once (a batch may hold 100,000) and the lines are put together
    from those pieces; an entry too big for a line of its own is bad input.
    """
    last_args = {**{k: v for k, v in args.items() if v is not None}, "commit": True}
    head = request(command, entries=[], **last_args)  # the longest envelope of any chunk
    overhead = len(head) + 1
    pieces = [json.dumps(entry, separators=(",", ":")) for entry in entries]
    lines: list[tuple[int, bytes]] = []
    start, size = 0, overhead
    for index, piece in enumerate(pieces):
        length = len(piece) + 1  # and a comma (json.dumps writes ASCII: a byte a character)
        if overhead + length > limit:
            raise CommandError(BAD_INPUT, f"entry {index + 1} is too long for one request")
        if size + length > limit:
            lines.append((index, _batch_line(command, pieces[start:index], {})))
            start, size = index, overhead
        size += length
    lines.append((len(pieces), _batch_line(command, pieces[start:], last_args)))
    return lines


def _batch_line(command: str, pieces: Sequence[str], args: dict[str, Any]) -> bytes:
    """A request line as protocol.request() writes it, with the entries already encoded."""
    fields = [f"{json.dumps(k)}:{json.dumps(v, separators=(',', ':'))}" for k, v in args.items()]
    fields.append('"entries":[' + ",".join(pieces) + "]")
    return f'{{"args":{{{",".join(fields)}}},"command":{json.dumps(command)}}}\n'.encode()


def call_batch(
    socket_path: Path,
    command: str,
    entries: Sequence[dict[str, Any]],
    *,
    timeout: float = TIMEOUT,
    commit_timeout: float = COMMIT_TIMEOUT,
    progress: Callable[[int], None] | None = None,
    **args: Any,
) -> Any:
    """Send a batch (ban.batch, unban.batch) in chunks of whole request lines on one
    connection, the last with commit; returns the commit's result or raises
    CommandError (then the controller changed nothing). `args` go with the commit.

    The chunks are streamed: all are sent, then the replies read, so the controller
    checks one chunk while the next is on its way. That is safe because a refused
    chunk fails the rest of its batch (commit included), and the replies are small
    (a batch of at most MAX_BATCH entries has at most a few hundred of them, well
    within a socket's buffer) until the last, which comes after everything was sent.
    """
    lines = batch_lines(command, entries, **args)
    try:
        sock = _connect(socket_path, timeout)
    except TimeoutError:
        raise _unavailable_on_timeout(socket_path, timeout) from None
    sock.settimeout(commit_timeout)
    try:
        with sock.makefile("rb") as replies:
            try:
                for _, line in lines:
                    sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the controller hung up: its reply says why
            first_error: CommandError | None = None
            result: Any = None
            for sent, _ in lines:
                reply = replies.readline(MAX_REPLY + 1)
                if not reply.endswith(b"\n"):
                    break  # closed (or a reply over the limit): the error so far, if any
                try:
                    result = _result(reply)
                except CommandError as exc:
                    first_error = first_error or exc  # the first says why; the rest follow it
                    continue
                if progress is not None:
                    progress(sent)
            else:
                if first_error is not None:
                    raise first_error
                return result
            if first_error is not None:
                raise first_error
            raise ControllerUnavailable(
                f"the controller closed {socket_path} in the middle of a batch", None
            )
    except TimeoutError:
        raise _unavailable_on_timeout(socket_path, commit_timeout) from None
    finally:
        sock.close()


def _read_line(sock: socket.socket, socket_path: Path) -> bytes:
    parts = []
    size = 0
    while True:
        part = sock.recv(65536)
        if not part:
            break
        parts.append(part)
        size += len(part)
        if part.endswith(b"\n"):
            break
        if size > MAX_REPLY:
            raise ControllerUnavailable(f"the controller's reply is over {MAX_REPLY} bytes", None)
    data = b"".join(parts)
    if not data:
        raise ControllerUnavailable(f"the controller closed {socket_path} without answering", None)
    return data
