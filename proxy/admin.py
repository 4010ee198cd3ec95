"""The admin listener: Prometheus metrics on an address apart from the public ports.

Runs in the master, on a thread of its own (the master's main thread
supervises the workers). Each scrape reads every worker's metric files
(prometheus-client's MultiProcessCollector); the master never handles a
client request, so a scrape costs the workers nothing. Optional bearer
token or basic auth, compared in constant time; the secrets come from
files and never reach a log.
"""

from __future__ import annotations

import base64
import hmac
import logging
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from stockade.proxy.settings import AdminConfig

log = logging.getLogger("stockade.proxy")

ADMIN_FILE = "admin.json"  # in status_dir: where the listener is, for `stockade top`


class AdminError(RuntimeError):
    pass


def _secret(path: Path, what: str) -> bytes:
    try:
        value = path.read_bytes().strip()
    except OSError as exc:
        raise AdminError(f"cannot read the admin {what} file {path}: {exc.strerror}") from None
    if not value:
        raise AdminError(f"the admin {what} file {path} is empty")
    return value


class Credentials:
    """What a scrape must present, if anything."""

    def __init__(self, config: AdminConfig) -> None:
        self.expected: list[bytes] = []
        if config.bearer_token_file is not None:
            self.expected.append(b"Bearer " + _secret(config.bearer_token_file, "token"))
        if config.basic_auth_user is not None and config.basic_auth_password_file is not None:
            password = _secret(config.basic_auth_password_file, "password")
            pair = config.basic_auth_user.encode() + b":" + password
            self.expected.append(b"Basic " + base64.b64encode(pair))

    def allowed(self, header: str | None) -> bool:
        if not self.expected:
            return True
        given = (header or "").encode("latin-1", "replace")
        # every candidate compared, in constant time each
        return any([hmac.compare_digest(given, want) for want in self.expected])


class _Handler(BaseHTTPRequestHandler):
    server_version = "stockade-admin"
    sys_version = ""
    directory: ClassVar[Path]
    credentials: ClassVar[Credentials]

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self._reply(404, b"not found: try /metrics\n", "text/plain")
            return
        if not self.credentials.allowed(self.headers.get("Authorization")):
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="stockade-admin"')
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.directory))  # type: ignore[no-untyped-call]
        self._reply(200, generate_latest(registry), CONTENT_TYPE_LATEST)

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds would drown the log


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class AdminServer:
    def __init__(self, config: AdminConfig, directory: Path) -> None:
        handler: type[_Handler] = type(
            "AdminHandler",
            (_Handler,),
            {"directory": directory, "credentials": Credentials(config)},
        )
        server_class = _Server6 if ":" in config.address else ThreadingHTTPServer
        try:
            self.httpd = server_class((config.address, config.port), handler)
        except OSError as exc:
            raise AdminError(
                f"cannot listen on {config.address}:{config.port} for metrics: {exc.strerror}"
            ) from None
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="admin", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        self.thread.start()
        log.info("metrics on http://%s:%d/metrics", *self.httpd.server_address[:2])

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
