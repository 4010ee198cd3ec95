"""A small HTTP listener for Prometheus scrapes, apart from the public ports.

Used by the proxy's master (metrics of every worker, and the status page)
and by the controller (the kernel's counters and the bans), each on a
thread of its own: a scrape never touches the request path. Read-only:
GET and HEAD, any other method 405. Optional bearer token or basic auth,
compared in constant time; the secrets come from files and never reach a
log.
"""

from __future__ import annotations

import base64
import hmac
import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

from prometheus_client import CONTENT_TYPE_LATEST

from stockade.config_fields import ConfigError, Section

log = logging.getLogger("stockade.admin")
REALM = "stockade-admin"
ALLOW = "GET, HEAD"


@dataclass(frozen=True)
class AdminConfig:
    """The metrics listener, apart from the public ports."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 9460  # 0: any free port (the proxy writes it to status_dir/admin.json)
    bearer_token_file: Path | None = None
    basic_auth_user: str | None = None
    basic_auth_password_file: Path | None = None


def parse_admin(section: Section, d: AdminConfig) -> AdminConfig:
    """An [...admin] table; `d` holds the defaults (the proxy and controller differ in port)."""
    address = section.get("address", str, d.address)
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError(f"{section.key('address')}: {address!r} is not an IP address") from None
    port = section.integer("port", d.port, 0, 65535)
    user = section.get("basic_auth_user", str, "") or None
    password = (
        section.path("basic_auth_password_file", Path())
        if "basic_auth_password_file" in section.table
        else None
    )
    if (user is None) != (password is None):
        raise ConfigError(
            f"{section.name}: basic_auth_user and basic_auth_password_file go together"
        )
    if user is not None and (":" in user or not user.isprintable()):
        raise ConfigError(f"{section.key('basic_auth_user')}: no ':' or control characters")
    config = AdminConfig(
        enabled=section.get("enabled", bool, d.enabled),
        address=address,
        port=port,
        bearer_token_file=section.path("bearer_token_file", Path())
        if "bearer_token_file" in section.table
        else None,
        basic_auth_user=user,
        basic_auth_password_file=password,
    )
    section.finish()
    return config


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
        # what a 401 offers: a browser asks for a password only when Basic is among them
        self.challenges: list[str] = []
        if config.bearer_token_file is not None:
            self.expected.append(b"Bearer " + _secret(config.bearer_token_file, "token"))
            self.challenges.append(f'Bearer realm="{REALM}"')
        if config.basic_auth_user is not None and config.basic_auth_password_file is not None:
            password = _secret(config.basic_auth_password_file, "password")
            pair = config.basic_auth_user.encode() + b":" + password
            self.expected.append(b"Basic " + base64.b64encode(pair))
            self.challenges.append(f'Basic realm="{REALM}", charset="UTF-8"')

    def allowed(self, header: str | None) -> bool:
        if not self.expected:
            return True
        given = (header or "").encode("latin-1", "replace")
        # every candidate compared, in constant time each
        return any([hmac.compare_digest(given, want) for want in self.expected])


@dataclass(frozen=True)
class Page:
    """A read-only page the listener serves besides /metrics (the proxy's status page)."""

    render: Callable[[str], bytes]  # the query string -> the body
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()


class _Handler(BaseHTTPRequestHandler):
    server_version = "stockade-admin"
    sys_version = ""
    pages: ClassVar[dict[str, Page]]
    credentials: ClassVar[Credentials]

    def do_GET(self) -> None:
        self._serve(with_body=True)

    def do_HEAD(self) -> None:
        self._serve(with_body=False)

    def _not_allowed(self) -> None:
        # nothing here changes state; the body of a refused request is never read
        self.close_connection = True
        self._reply(405, b"method not allowed: GET only\n", "text/plain", (("Allow", ALLOW),))

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _not_allowed

    def _serve(self, with_body: bool) -> None:
        path, _, query = self.path.partition("?")
        page = self.pages.get(path)
        if page is None:
            paths = " or ".join(p for p in self.pages if p != "/")
            self._reply(404, f"not found: try {paths}\n".encode(), "text/plain")
            return
        if not self.credentials.allowed(self.headers.get("Authorization")):
            self.send_response(401)
            for challenge in self.credentials.challenges:
                self.send_header("WWW-Authenticate", challenge)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        try:
            body = page.render(query)
        except Exception:  # a scrape must not take the listener down
            log.exception("admin page %s failed", path)
            self._reply(500, b"scrape failed\n", "text/plain")
            return
        self._reply(200, body, page.content_type, page.headers, with_body)

    def _reply(
        self,
        status: int,
        body: bytes,
        content_type: str,
        headers: tuple[tuple[str, str], ...] = (),
        with_body: bool = True,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # scrapes every few seconds would drown the log


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class AdminServer:
    """`render` makes the /metrics exposition; `pages` adds more paths (all read-only)."""

    def __init__(
        self,
        config: AdminConfig,
        render: Callable[[], bytes],
        pages: Mapping[str, Page] | None = None,
    ) -> None:
        routes = {"/metrics": Page(lambda query: render(), CONTENT_TYPE_LATEST), **(pages or {})}
        self.paths = list(routes)
        handler: type[_Handler] = type(
            "AdminHandler",
            (_Handler,),
            {"pages": routes, "credentials": Credentials(config)},
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
        if len(self.paths) > 1:
            log.info("admin pages on the same listener: %s", ", ".join(self.paths[1:]))

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
