"""lab/redis_server.py asks a starting redis-server for PONG: a reply that arrives in pieces
is still read whole (one recv returned "+" and the server looked dead)."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest

from stockade.lab.redis_server import RedisServer


def fake_redis(path: Path, password: str | None, piece: int) -> threading.Thread:
    """Answers AUTH (if a password is set) and PING, `piece` bytes per send, then stops."""
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)

    def send_in_pieces(conn: socket.socket, reply: bytes) -> None:
        for i in range(0, len(reply), piece):
            conn.sendall(reply[i : i + piece])
            time.sleep(0.005)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.settimeout(5)
            if password is not None:
                conn.recv(1024)
                send_in_pieces(conn, b"+OK\r\n")
            conn.recv(1024)
            send_in_pieces(conn, b"+PONG\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("password", [None, "secret"])
@pytest.mark.parametrize("piece", [1, 2, 64])
def test_pong_in_pieces_is_an_answer(tmp_path: Path, password: str | None, piece: int) -> None:
    server = RedisServer(tmp_path, password=password)
    thread = fake_redis(server.socket_path, password, piece)
    assert server._answers()
    thread.join(5)


def test_no_pong_is_no_answer(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(server.socket_path))
    listener.listen(1)

    def serve() -> None:
        with listener, listener.accept()[0] as conn:
            conn.recv(1024)
            conn.sendall(b"-ERR loading\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert not server._answers()
    thread.join(5)
