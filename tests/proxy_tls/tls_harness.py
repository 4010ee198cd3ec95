"""Helpers for the TLS and redirect tests: an aiohttp app served from a thread, blocking clients.

The server runs on its own event loop in a thread, so the tests can use plain blocking
sockets (and so hold a connection open across a reload) without an asyncio test plugin.
Everything listens on and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import warnings
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stockade.proxy.settings import Certificate

LOOPBACK = "127.0.0.1"
T = TypeVar("T")


class Served:
    """`with Served(app, ssl_context) as server:` serves app on 127.0.0.1:server.port."""

    def __init__(self, app: web.Application, ssl_context: ssl.SSLContext | None = None) -> None:
        self._app = app
        self._ssl_context = ssl_context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="served")
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        self.port = 0

    def __enter__(self) -> Served:
        self._thread.start()
        try:
            self._await(self._start)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._await(self._runner.cleanup)
        finally:
            self._stop()

    async def _start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, LOOPBACK, 0, ssl_context=self._ssl_context)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def _await(self, factory: Callable[[], Coroutine[Any, Any, T]]) -> T:
        return asyncio.run_coroutine_threadsafe(factory(), self._loop).result(timeout=10)

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def in_loop(self, function: Callable[[], T]) -> T:
        """Call function on the server's event loop thread (as a signal handler would)."""

        async def run() -> T:
            return function()

        return self._await(run)


def hello_app() -> web.Application:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/", hello)
    return app


@contextmanager
def tls_connect(
    port: int, context: ssl.SSLContext, server_name: str | None
) -> Iterator[ssl.SSLSocket]:
    """A TLS connection to 127.0.0.1:port; server_name None sends no SNI."""
    with (
        socket.create_connection((LOOPBACK, port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        yield tls


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of one HTTP/1.1 response with a length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed in the body")
        body += chunk
    return int(status_line.split()[1]), headers, body


def get(sock: socket.socket, host: str, path: str = "/") -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    status, _, body = read_response(sock)
    return status, body


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    """Verifies the chain against the test CA; names are checked by the tests themselves."""
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    return context


def legacy_context(maximum: ssl.TLSVersion, ciphers: str, *, server: bool) -> ssl.SSLContext:
    """A context that really offers old protocols and weak suites.

    OpenSSL 3 refuses TLS 1.0/1.1 and SHA-1 signatures at its default security level on
    both sides, so a test of the server's refusal needs a client at SECLEVEL=0; the same
    settings on a control server prove that such a client does complete a handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # ssl.TLSVersion.TLSv1 is
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = maximum
    context.set_ciphers(f"{ciphers}:@SECLEVEL=0")
    if not server:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def write_pair(leaf: trustme.LeafCert, directory: Path, stem: str) -> Certificate:
    """Write leaf's chain and key as <stem>.pem and <stem>.key."""
    cert, key = directory / f"{stem}.pem", directory / f"{stem}.key"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    key.chmod(0o600)
    return Certificate(cert, key)


def write_cn_only(directory: Path, common_name: str) -> Certificate:
    """A self-signed certificate with a common name and no subjectAltName extension."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pair = Certificate(directory / "cn.pem", directory / "cn.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pair


def _peer(tls: ssl.SSLSocket) -> x509.Certificate:
    der = tls.getpeercert(binary_form=True)
    assert der, "no peer certificate"
    return x509.load_der_x509_certificate(der)


def peer_names(tls: ssl.SSLSocket) -> list[str]:
    """The DNS names in the certificate the server presented."""
    san = _peer(tls).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return [str(name) for name in san.value.get_values_for_type(x509.DNSName)]


def peer_serial(tls: ssl.SSLSocket) -> int:
    return _peer(tls).serial_number


def handshake_error(
    server: ssl.SSLContext, client: ssl.SSLContext, server_name: str | None
) -> ssl.SSLError | None:
    """Shake hands over a socketpair with blocking sockets; the client's error, if any.

    Blocking sockets flush the server's alert before closing, so the client sees why.
    """
    server_end, client_end = socket.socketpair()
    server_end.settimeout(5)
    client_end.settimeout(5)

    def serve() -> None:
        try:
            with server.wrap_socket(server_end, server_side=True):
                pass
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, name="handshake")
    thread.start()
    try:
        with client.wrap_socket(client_end, server_hostname=server_name):
            return None
    except ssl.SSLError as exc:
        return exc
    finally:
        thread.join(timeout=10)
        server_end.close()
        client_end.close()
