"""TLS termination: one server context, several certificates chosen by SNI, reload on SIGHUP.

The listening socket gets `ServerTls.context`, which holds the protocol settings but no
certificate. Its `sni_callback` runs for every handshake (also when the client sends no
server name) and moves the connection to the per-certificate context that matches the name,
or to the first certificate when none matches. `reload()` builds a new table of contexts
from the files and swaps it in one assignment, only when every file loaded; connections that
are already established keep the context they shook hands with.

Policy: a file that is missing, unreadable, not PEM, or a key that does not match its
certificate is refused with `TlsConfigError`; an expired (or not yet valid) certificate is
served with a warning in the log, so an operator who forgot to renew gets a warning, not an
outage.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol, cast

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from stockade.proxy.settings import Certificate

log = logging.getLogger("stockade.proxy")

# TLS 1.2 suites: forward-secret key exchange and AEAD only (no CBC, no static RSA key
# exchange). TLS 1.3 suites are all AEAD and are left at OpenSSL's defaults.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL"
ALPN_PROTOCOLS = ("http/1.1",)
HANDSHAKE_BACKSTOP = 1.0  # asyncio's own handshake timer fires this long after TlsServer's
ACCEPTS_PER_WAKEUP = 128  # then other work gets the loop (asyncio accepts up to its backlog)
ACCEPT_PAUSE_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

Clock = Callable[[], datetime]


class TlsConfigError(ValueError):
    """A certificate or key that cannot be served; the message names the file."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _settings(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION
    context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.set_alpn_protocols(list(ALPN_PROTOCOLS))
    return context


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{what} {path}: file not found") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{what} {path}: is a directory, not a file") from None
    except PermissionError:
        raise TlsConfigError(
            f"{what} {path}: permission denied; the proxy's user (after dropping privileges,"
            " for reloads) must be able to read it"
        ) from None
    except OSError as exc:
        raise TlsConfigError(f"{what} {path}: cannot read it ({exc.strerror})") from None


def _refuse_password() -> bytes:
    # load_cert_chain would otherwise prompt on the terminal for an encrypted key.
    raise ValueError("the key is encrypted")


def _dns_names(cert: x509.Certificate) -> list[str]:
    """The certificate's DNS subject alternative names, or its common name without any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = [str(n) for n in san.value.get_values_for_type(x509.DNSName)]
    except x509.ExtensionNotFound:
        names = []
    if not names:
        for attribute in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attribute.value
            names.append(value if isinstance(value, str) else value.decode("ascii", "replace"))
    return [n.lower().rstrip(".") for n in names if n]


def _validity(cert: x509.Certificate) -> tuple[datetime, datetime]:
    # cryptography >= 42 has timezone-aware *_utc attributes and deprecates the naive ones.
    before, after = (
        getattr(cert, "not_valid_before_utc", None),
        getattr(cert, "not_valid_after_utc", None),
    )
    if isinstance(before, datetime) and isinstance(after, datetime):
        return before, after
    return cert.not_valid_before.replace(tzinfo=UTC), cert.not_valid_after.replace(tzinfo=UTC)


@dataclass(frozen=True)
class _Loaded:
    certificate: Certificate
    context: ssl.SSLContext
    names: tuple[str, ...]


def _load(certificate: Certificate, now: datetime) -> _Loaded:
    cert_path, key_path = certificate.cert, certificate.key
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "private key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        raise TlsConfigError(f"certificate {cert_path}: not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:  # the key is encrypted
        raise TlsConfigError(
            f"private key {key_path}: encrypted with a passphrase; store it unencrypted"
        ) from None
    except ValueError:
        raise TlsConfigError(f"private key {key_path}: not a PEM private key") from None
    except UnsupportedAlgorithm:
        raise TlsConfigError(f"private key {key_path}: unsupported key algorithm") from None
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != cert.public_key().public_bytes(*spki):
        raise TlsConfigError(f"private key {key_path}: does not match certificate {cert_path}")

    not_before, not_after = _validity(cert)
    if now > not_after:
        log.warning("certificate %s expired on %s; renew it", cert_path, not_after.isoformat())
    elif now < not_before:
        log.warning("certificate %s is not valid before %s", cert_path, not_before.isoformat())

    context = _settings(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        context.load_cert_chain(cert_path, key_path, password=_refuse_password)
    except (ssl.SSLError, OSError, ValueError) as exc:  # the files changed since we read them
        raise TlsConfigError(f"certificate {cert_path}: OpenSSL refused it ({exc})") from None
    return _Loaded(certificate, context, tuple(_dns_names(cert)))


@dataclass(frozen=True)
class _Table:
    """Per-certificate contexts by server name; the first certificate is the default."""

    default: _Loaded
    exact: dict[str, _Loaded]
    wildcard: dict[str, _Loaded]  # "example.com" for a certificate naming "*.example.com"

    @classmethod
    def build(cls, loaded: Sequence[_Loaded]) -> _Table:
        exact: dict[str, _Loaded] = {}
        wildcard: dict[str, _Loaded] = {}
        for item in loaded:
            for name in item.names:
                if name.startswith("*."):
                    wildcard.setdefault(name[2:], item)
                elif "*" not in name:  # partial wildcards such as "f*.example.com": ignored
                    exact.setdefault(name, item)
        return cls(loaded[0], exact, wildcard)

    def lookup(self, server_name: str | None) -> _Loaded:
        if not server_name:
            return self.default
        name = server_name.lower().rstrip(".")
        found = self.exact.get(name)
        if found is None and "." in name:
            found = self.wildcard.get(name.split(".", 1)[1])  # "*" stands for one label
        return found or self.default


class HandshakeWatch:
    """Counts TLS handshakes that began and never completed.

    The SNI callback runs once a ClientHello has been read; a connection
    that completes the handshake reaches the HTTP protocol, which reports
    it here. A TLS object dropped before that failed its handshake (bad
    version or cipher, no certificate the client trusts, a client that
    went away or timed out). asyncio and uvloop only log such failures in
    debug mode, so they are seen here, through weak references.
    """

    def __init__(self) -> None:
        self.pending: dict[int, weakref.ref[object]] = {}
        self.failures = 0
        self.on_failure: Callable[[], None] | None = None

    def started(self, connection: object) -> None:
        key = id(connection)
        if key not in self.pending:
            self.pending[key] = weakref.ref(connection, lambda _ref: self._gone(key))

    def completed(self, connection: object) -> None:
        self.pending.pop(id(connection), None)

    def _gone(self, key: int) -> None:
        if self.pending.pop(key, None) is not None:
            self.failures += 1
            if self.on_failure is not None:
                self.on_failure()


HANDSHAKES = HandshakeWatch()  # per process: each worker counts its own


class ServerTls:
    """The TLS side of one HTTPS listener."""

    def __init__(self, certificates: Sequence[Certificate], clock: Clock = _utcnow) -> None:
        self._certificates = tuple(certificates)
        self._clock = clock
        self._table = self._build()
        self.context = _settings(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
        self.context.sni_callback = self._select

    def _build(self) -> _Table:
        if not self._certificates:
            raise TlsConfigError("no certificates: an HTTPS listener needs a cert and a key")
        now = self._clock()
        return _Table.build([_load(c, now) for c in self._certificates])

    def _select(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        HANDSHAKES.started(connection)
        connection.context = self._table.lookup(server_name).context

    def reload(self) -> None:
        """Re-read every file; swap them in only if all load, else raise and keep the old."""
        self._table = self._build()

    def names(self) -> dict[str, Path]:
        """Server name (exact, or "*.example.com") -> certificate file, for status."""
        table = self._table
        names = {n: item.certificate.cert for n, item in table.exact.items()}
        names.update({f"*.{n}": item.certificate.cert for n, item in table.wildcard.items()})
        return names


class GuardedConnection(Protocol):
    """The HTTP side of one HTTPS connection, as TlsServer drives it (GuardedRequestHandler)."""

    def take_slot(self, peer: str | None) -> bool: ...
    def header_deadline(self) -> float: ...
    def handshake_failed(self, timed_out: bool) -> None: ...


class TlsServer(asyncio.AbstractServer):
    """Accepts HTTPS connections on a listening socket: admitted first, then a bounded handshake.

    asyncio's own TLS server makes the HTTP protocol at accept but tells it
    nothing until the handshake is done, and nothing at all when it fails;
    so a client that connects and stays silent holds a socket for asyncio's
    60 s handshake timeout, counted nowhere. Here each accepted socket first
    takes one of max_connections (or is closed at once: over the cap, or a
    denied source), then shakes hands through connect_accepted_socket until
    the connection's header deadline. The handshake's end is certain: the
    HTTP protocol gets connection_made, or the slot is given back through
    handshake_failed (failure, timeout, client gone, worker stopping).
    """

    def __init__(
        self,
        sock: socket.socket,
        connections: Callable[[], GuardedConnection],
        context: ssl.SSLContext,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._connections = connections
        self._context = context
        self._serving = False
        self._handshakes: set[asyncio.Task[None]] = set()  # the loop keeps only weak refs
        self._retry: asyncio.TimerHandle | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,) if self._serving else ()

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def is_serving(self) -> bool:
        return self._serving

    async def start_serving(self) -> None:
        if not self._serving and self._sock.fileno() >= 0:
            self._sock.setblocking(False)
            self._loop.add_reader(self._sock.fileno(), self._accept)
            self._serving = True

    async def serve_forever(self) -> None:
        await self.start_serving()
        await asyncio.Event().wait()

    def close(self) -> None:
        """Stop accepting (handshakes under way go on, bounded by their deadline)."""
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        if self._serving:
            self._loop.remove_reader(self._sock.fileno())
            self._serving = False
        self._sock.close()  # as asyncio's Server does: the master keeps its own copy

    async def wait_closed(self) -> None:
        pass

    def _accept(self) -> None:
        for _ in range(ACCEPTS_PER_WAKEUP):
            try:
                conn, address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue  # the client gave up while queued
            except OSError as exc:
                if exc.errno not in ACCEPT_PAUSE_ERRNOS:
                    log.error("accept on %s failed: %s", self._address(), exc)
                    continue
                # Out of descriptors or memory: stop accepting for a moment rather than
                # spin on a listening socket that stays readable (as asyncio does).
                log.error("accept on %s failed: %s; retrying in 1s", self._address(), exc)
                self._loop.remove_reader(self._sock.fileno())
                self._retry = self._loop.call_later(1.0, self._resume)
                return
            conn.setblocking(False)
            connection = self._connections()
            peer = address[0] if isinstance(address, tuple) else None
            if not connection.take_slot(peer):
                conn.close()  # over max_connections or a denied source (counted): no TLS
                continue
            task = self._loop.create_task(self._handshake(conn, connection))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            self._loop.add_reader(self._sock.fileno(), self._accept)

    def _address(self) -> str:
        try:
            return str(self._sock.getsockname()[:2])
        except OSError:
            return "a closed socket"

    async def _handshake(self, conn: socket.socket, connection: GuardedConnection) -> None:
        loop = self._loop
        deadline = connection.header_deadline()
        done = timed_out = False
        try:
            async with asyncio.timeout_at(deadline):
                await loop.connect_accepted_socket(
                    lambda: cast(asyncio.BaseProtocol, connection),
                    conn,
                    ssl=self._context,
                    # asyncio's own timer: a backstop that never fires before ours
                    ssl_handshake_timeout=max(deadline - loop.time(), 0.0) + HANDSHAKE_BACKSTOP,
                )
            done = True
        except TimeoutError:
            timed_out = True
        except OSError:  # ssl.SSLError included: a failed handshake, or the client left
            pass
        except Exception:
            log.exception("TLS handshake with a client failed unexpectedly")
        finally:
            # The transport closed itself (and the socket) on failure; only the slot is left.
            if not done:
                connection.handshake_failed(timed_out)


class TlsSite(web.SockSite):
    """An HTTPS listener's socket, served by a TlsServer."""

    __slots__ = ("_connections",)

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        connections: Callable[[], GuardedConnection],
        context: ssl.SSLContext,
    ) -> None:
        super().__init__(runner, sock, ssl_context=context)
        self._connections = connections

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with its runner
        assert self._ssl_context is not None
        server = TlsServer(self._sock, self._connections, self._ssl_context)
        await server.start_serving()
        self._server = server
