"""The lab's upstream: a tiny HTTP/1.1 JSON API, standard library only.

    python -m stockade.lab.upstream --netns stk3fa2-up --port 8080

joins the network namespace itself (pyroute2.netns.setns, so it can be
started from the root namespace and its PID is its own), listens on one
dual-stack socket ([::]:PORT, which also accepts IPv4 as v4-mapped
addresses), prints one line "ready PORT" on stdout once it accepts
connections, and exits on SIGTERM.

    GET /health     200 {"ok": true}
    GET /api/hello  200 {"hello": "world", "client": "<peer address>"}
    anything else   404 {"error": "not found", ...}
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import signal
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

READY_PREFIX = "ready"


def peer_address(host: str) -> str:
    """The client's address as written by a human: v4-mapped v6 becomes plain v4."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "stockade-lab-upstream/1"
    # keep-alive connections idle longer than this are closed; bounds threads
    timeout = 30

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/health":
            self._reply(200, {"ok": True})
        elif path == "/api/hello":
            self._reply(200, {"hello": "world", "client": peer_address(self.client_address[0])})
        else:
            self._not_found()

    def do_HEAD(self) -> None:
        self._not_found()

    def do_POST(self) -> None:
        self._discard_body()
        self._not_found()

    do_PUT = do_POST
    do_PATCH = do_POST
    do_DELETE = do_POST
    do_OPTIONS = do_POST

    def _not_found(self) -> None:
        self._reply(404, {"error": "not found", "method": self.command, "path": self.path})

    def _discard_body(self) -> None:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = 0
        if length > 0:
            self.rfile.read(min(length, 1 << 20))
        if length > 1 << 20:
            self.close_connection = True

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = (json.dumps(body, sort_keys=True) + "\n").encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # no line per request: benchmarks send millions, and the log lives on tmpfs;
        # errors still go through log_error
        pass

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"{self.address_string()} {format % args}\n")


class DualStackServer(ThreadingHTTPServer):
    """[::]:port with IPV6_V6ONLY off: one socket for IPv4 and IPv6."""

    address_family = socket.AF_INET6
    daemon_threads = True
    allow_reuse_address = True

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


class _Stop(Exception):
    pass


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def make_server(host: str, port: int) -> ThreadingHTTPServer:
    """A server bound to host:port; `host` "::" means every v4 and v6 address."""
    if ":" in host:
        return DualStackServer((host, port), Handler)
    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stockade.lab.upstream", description=__doc__)
    parser.add_argument("--netns", help="network namespace to join first (default: stay)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--host", default="::", help="address to bind (default: [::], dual stack)")
    args = parser.parse_args(argv)

    # a SIGTERM that arrives before serve_forever still stops us cleanly
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.netns:
            from pyroute2 import netns

            netns.setns(args.netns, flags=0)  # flags=0: never create it
        server = make_server(args.host, args.port)
    except _Stop:
        return 0
    except OSError as exc:
        print(f"upstream: cannot start in netns {args.netns!r}: {exc}", file=sys.stderr)
        return 1

    try:
        print(f"{READY_PREFIX} {server.server_address[1]}", flush=True)
        # nothing else goes to stdout: the parent stops reading after "ready"
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        server.serve_forever(poll_interval=0.5)
    except (_Stop, KeyboardInterrupt):
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
