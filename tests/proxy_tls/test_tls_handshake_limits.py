"""TLS handshakes on the gateway's HTTPS listener: timed by header_timeout from accept,
counted against max_connections from accept, and their slot given back exactly once.

Every test runs on asyncio's loop and on uvloop's (the workers use uvloop when present).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st
from tls_gateway_harness import (
    LOOPBACK,
    LoopFactory,
    RawTlsClient,
    TlsGateway,
    closed_after,
    gateway_config,
    https_get,
)
from tls_harness import legacy_context, write_pair

from stockade.proxy.limits import LimitCounters

LOOPS = pytest.mark.parametrize(
    "loop_factory",
    [asyncio.new_event_loop, uvloop.new_event_loop],
    ids=["asyncio", "uvloop"],
)
SLACK = 0.6  # scheduling slack on top of a deadline (a 2-core host runs other suites too)
REQUEST = b"GET / HTTP/1.1\r\nHost: api.example.test\r\nConnection: close\r\n\r\n"


@pytest.fixture
def make_gateway(leaves: dict[str, trustme.LeafCert], tmp_path: Path) -> Callable[..., TlsGateway]:
    certificate = write_pair(leaves["api"], tmp_path, "gw")

    def make(loop_factory: LoopFactory, **limits: float) -> TlsGateway:
        return TlsGateway(
            gateway_config(certificate, tmp_path / "access.log", **limits), loop_factory
        )

    return make


def silent(port: int) -> tuple[socket.socket, float]:
    """A TCP connection that never sends a byte, and when it was made."""
    return socket.create_connection((LOOPBACK, port), timeout=10), time.monotonic()


def idle(counters: LimitCounters) -> bool:
    return counters.connections_active == 0


@LOOPS
def test_silent_connections_are_closed_at_the_header_timeout(
    make_gateway: Callable[..., TlsGateway], loop_factory: LoopFactory
) -> None:
    with make_gateway(loop_factory, header_timeout=1.0) as gw:
        conns = [silent(gw.port) for _ in range(20)]
        try:
            waited = [closed_after(sock, started) for sock, started in conns]
        finally:
            for sock, _ in conns:
                sock.close()
        assert all(1.0 - 0.1 <= t <= 1.0 + SLACK for t in waited), waited
        counters = gw.wait_for(idle)
        assert counters.connections_active == 0
        assert counters.handshake_timeouts == 20


@LOOPS
def test_handshakes_under_way_count_against_max_connections(
    make_gateway: Callable[..., TlsGateway], loop_factory: LoopFactory, client: ssl.SSLContext
) -> None:
    with make_gateway(loop_factory, header_timeout=1.5, max_connections=4) as gw:
        conns = [silent(gw.port) for _ in range(4)]
        try:
            assert gw.wait_for(lambda c: c.connections_active == 4).connections_active == 4
            # The fifth is closed at once, before any TLS: a real client fails its handshake...
            started = time.monotonic()
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                https_get(gw.port, client)
            assert time.monotonic() - started < 0.5
            # ...and a bare TCP connection sees the close without sending anything.
            sock, started = silent(gw.port)
            with sock:
                assert closed_after(sock, started) < 0.5
            assert gw.snapshot().connections_refused == 2
            # Once the silent ones time out, their slots are free again.
            for sock, started in conns:
                assert closed_after(sock, started) <= 1.5 + SLACK
        finally:
            for sock, _ in conns:
                sock.close()
        assert https_get(gw.port, client) == 200
        counters = gw.wait_for(idle)
        assert (counters.connections_active, counters.handshake_timeouts) == (0, 4)


def trickle(tls: RawTlsClient, pieces: int, seconds: float) -> int:
    """Send the ClientHello in `pieces` writes spread over `seconds`; its size."""
    hello = tls.client_hello()
    size = -(-len(hello) // pieces)
    for offset in range(0, len(hello), size):
        tls.sock.sendall(hello[offset : offset + size])
        time.sleep(seconds / pieces)
    return len(hello)


@LOOPS
def test_a_slow_handshake_within_the_bound_succeeds(
    make_gateway: Callable[..., TlsGateway], loop_factory: LoopFactory, client: ssl.SSLContext
) -> None:
    with make_gateway(loop_factory, header_timeout=2.0) as gw:
        tls = RawTlsClient(gw.port, client)
        try:
            assert trickle(tls, pieces=12, seconds=1.0) > 12 * 8  # really in pieces
            tls.finish_handshake()
            tls.send(REQUEST)
            assert tls.response().startswith(b"HTTP/1.1 200 ")
        finally:
            tls.close()
        assert gw.wait_for(idle).connections_active == 0


@LOOPS
def test_handshake_and_first_head_share_one_header_timeout(
    make_gateway: Callable[..., TlsGateway], loop_factory: LoopFactory, client: ssl.SSLContext
) -> None:
    """The head gets what the handshake left of header_timeout, not a fresh one."""
    with make_gateway(loop_factory, header_timeout=1.5) as gw:
        tls = RawTlsClient(gw.port, client)
        started = time.monotonic()
        try:
            trickle(tls, pieces=8, seconds=0.9)
            tls.finish_handshake()
            tls.send(b"GET / HTTP/1.1\r\nHost: api.example.test\r\n")  # and no end of head
            response = tls.response()
            waited = time.monotonic() - started
        finally:
            tls.close()
        assert response.startswith(b"HTTP/1.1 408 "), response[:100]
        assert 1.5 - 0.1 <= waited <= 1.5 + SLACK, waited  # a fresh timer would be 2.4 s
        assert gw.wait_for(idle).header_timeouts == 1


@LOOPS
def test_a_handshake_slower_than_the_bound_is_cut(
    make_gateway: Callable[..., TlsGateway], loop_factory: LoopFactory, client: ssl.SSLContext
) -> None:
    with make_gateway(loop_factory, header_timeout=1.0) as gw:
        tls = RawTlsClient(gw.port, client)
        started = time.monotonic()
        try:
            with pytest.raises((EOFError, ConnectionError, ssl.SSLError)):
                trickle(tls, pieces=20, seconds=3.0)
                tls.finish_handshake()
            waited = time.monotonic() - started
        finally:
            tls.close()
        assert waited <= 1.0 + SLACK + 3.0 / 20  # one more piece may be on its way
        counters = gw.wait_for(idle)
        assert (counters.connections_active, counters.handshake_timeouts) == (0, 1)


# Clients that end their connection in every way a handshake can end; each returns what
# the client saw: the status of its request, or 0 when it got no HTTP answer.


def _get(port: int, client: ssl.SSLContext) -> int:
    return https_get(port, client)


def _plain_http(port: int, client: ssl.SSLContext) -> int:
    sock, started = silent(port)
    with sock:
        sock.sendall(REQUEST)
        closed_after(sock, started)
    return 0


def _hello_then_reset(port: int, client: ssl.SSLContext) -> int:
    tls = RawTlsClient(port, client)
    tls.sock.sendall(tls.client_hello())
    tls.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    tls.close()  # RST
    return 0


def _half_hello_then_close(port: int, client: ssl.SSLContext) -> int:
    tls = RawTlsClient(port, client)
    hello = tls.client_hello()
    tls.sock.sendall(hello[: len(hello) // 2])
    tls.close()
    return 0


def _connect_and_close(port: int, client: ssl.SSLContext) -> int:
    silent(port)[0].close()
    return 0


def _handshake_then_close(port: int, client: ssl.SSLContext) -> int:
    tls = RawTlsClient(port, client)
    tls.sock.sendall(tls.client_hello())
    tls.finish_handshake()
    tls.close()
    return 0


def _handshake_then_half_a_head(port: int, client: ssl.SSLContext) -> int:
    tls = RawTlsClient(port, client)
    tls.sock.sendall(tls.client_hello())
    tls.finish_handshake()
    tls.send(b"GET / HTTP/1.1\r\nHo")
    tls.close()
    return 0


def _tls10_client(port: int, client: ssl.SSLContext) -> int:
    old = legacy_context(ssl.TLSVersion.TLSv1, "ALL", server=False)
    with socket.create_connection((LOOPBACK, port), timeout=10) as raw:
        with contextlib.suppress(ssl.SSLError, ConnectionError):
            old.wrap_socket(raw, server_hostname="api.example.test").close()
    return 0


CLIENTS = {
    "get": _get,
    "plain_http": _plain_http,
    "hello_then_reset": _hello_then_reset,
    "half_hello_then_close": _half_hello_then_close,
    "connect_and_close": _connect_and_close,
    "handshake_then_close": _handshake_then_close,
    "handshake_then_half_a_head": _handshake_then_half_a_head,
    "tls10_client": _tls10_client,
}


@pytest.fixture(
    scope="module",
    params=[asyncio.new_event_loop, uvloop.new_event_loop],
    ids=["asyncio", "uvloop"],
)
def shared_gateway(
    request: pytest.FixtureRequest,
    leaves: dict[str, trustme.LeafCert],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[TlsGateway]:
    directory = tmp_path_factory.mktemp("shared")
    certificate = write_pair(leaves["api"], directory, "gw")
    config = gateway_config(certificate, directory / "access.log", max_connections=64)
    with TlsGateway(config, request.param) as gw:
        yield gw


@settings(max_examples=12)
@given(st.lists(st.sampled_from(sorted(CLIENTS)), min_size=1, max_size=10))
def test_every_ending_gives_its_slot_back_once(
    shared_gateway: TlsGateway, ca_client: ssl.SSLContext, kinds: list[str]
) -> None:
    """Concurrent clients of every kind: each is served or refused as its kind says, and
    once all are gone no slot is held (a leak stays above 0, a double release below)."""
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def run(index: int, kind: str) -> None:
        try:
            results[index] = CLIENTS[kind](shared_gateway.port, ca_client)
        except BaseException as exc:  # reported below, with the kind
            errors.append(exc)

    threads = [
        threading.Thread(target=run, args=(i, kind), name=kind) for i, kind in enumerate(kinds)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not errors, (kinds, errors)
    assert [results[i] for i, kind in enumerate(kinds) if kind == "get"] == [200] * kinds.count(
        "get"
    )
    counters = shared_gateway.wait_for(idle)
    assert counters.connections_active == 0, (kinds, counters)
    assert counters.connections_refused == 0


@pytest.fixture(scope="module")
def ca_client(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    context.check_hostname = False
    return context
