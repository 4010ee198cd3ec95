"""An HTTP/1.1 server on 127.0.0.1 that answers the way real identity providers' servers and
their proxies do: the reply in many small writes with pauses between (TCP_NODELAY, so each
write is its own TCP segment, or its own TLS record over TLS), the body chunked or with a
Content-Length. Written by hand: aiohttp's server would coalesce the writes.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from jwt_issuer import public_jwk

MAX_REQUEST_HEAD = 16384
DISCOVERY = "/.well-known/openid-configuration"

SMALL = {"keys": [public_jwk("ed25519-pieces", "pieces")]}  # ~150 bytes: 1-byte writes
LARGE = {
    "keys": [
        public_jwk("p256", "a"),
        public_jwk("p384", "b"),
        public_jwk("p521", "c"),
        public_jwk("rsa", "d"),
        public_jwk("rsa-pieces", "pieces"),  # last: no prefix of the body holds it
    ]
}


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def json(cls, value: Any, *headers: tuple[str, str]) -> Reply:
        return cls(
            200, json.dumps(value).encode(), [("Content-Type", "application/json"), *headers]
        )


Route = Reply | Callable[[], Reply]


def wire(reply: Reply, chunked: bool, chunk_size: int) -> bytes:
    """The whole response as bytes: head, then the body chunked or with a Content-Length."""
    head = [f"HTTP/1.1 {reply.status} X", "Connection: close"]
    head += [f"{name}: {value}" for name, value in reply.headers]
    if chunked:
        head.append("Transfer-Encoding: chunked")
        body = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part)
            for part in (
                reply.body[i : i + chunk_size] for i in range(0, len(reply.body), chunk_size)
            )
        )
        body += b"0\r\n\r\n"
    else:
        head.append(f"Content-Length: {len(reply.body)}")
        body = reply.body
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


@dataclass
class PiecewiseServer:
    """Serves `routes` by path; every reply goes out `piece` bytes per write, `pause`
    seconds apart. `stall_after`: stop writing (but keep the connection) after this many
    bytes, like a server that hangs mid-body."""

    routes: dict[str, Route] = field(default_factory=dict)
    piece: int = 7
    pause: float = 0.0005
    chunked: bool = True
    chunk_size: int = 5
    tls: ssl.SSLContext | None = None
    stall_after: int | None = None
    hits: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _server: asyncio.Server | None = None
    _handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def base(self) -> str:
        scheme = "https" if self.tls is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def url(self, path: str) -> str:
        return self.base + path

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):  # a stalled reply among them
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_REQUEST_HEAD:
                return
            path = head.split(b" ", 2)[1].decode("ascii", "replace")
            self.hits[path] += 1
            route = self.routes.get(path, Reply(404, b"not here"))
            reply = route() if callable(route) else route
            data = wire(reply, self.chunked, self.chunk_size)
            if self.stall_after is not None:
                data = data[: self.stall_after]
            for start in range(0, len(data), self.piece):
                writer.write(data[start : start + self.piece])
                await writer.drain()
                await asyncio.sleep(self.pause)
            if self.stall_after is not None:
                await asyncio.sleep(3600)  # until the client gives up (stop() closes)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()


def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "idp-ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
