"""What the gateway decided on (path, Host) is exactly what the upstream receives.

A property test through the running gateway with raw sockets: for generated
request targets (origin and absolute form, hostile paths) and Host values, a
request is either refused before the upstream, or the upstream receives the
origin-form path every stage saw and a Host equal to the authority it was
routed by.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from boundary_harness import RecordingUpstream, Running, running_gateway, two_route_config
from hypothesis import event, given
from hypothesis import strategies as st

from stockade.proxy.routing import parse_authority
from stockade.proxy.settings import Route


@dataclass(repr=False)  # a failing example prints without the whole history
class Live:
    gateway: Running
    upstream: RecordingUpstream


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    """One gateway and upstream on a loop in a thread, for every generated example."""
    tmp_path: Path = tmp_path_factory.mktemp("decided")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    up = RecordingUpstream("up")
    stop = asyncio.Event()
    ready: asyncio.Future[Running] = loop.create_future()

    async def serve() -> None:
        await up.start()
        base = two_route_config(tmp_path, up, open_route={"allow_path_params": True})
        api = Route(name="api", pool="api", host="api.example.test", case_insensitive=True)
        try:
            async with running_gateway(replace(base, routes=(*base.routes, api))) as gw:
                ready.set_result(gw)
                await stop.wait()
        finally:
            await up.stop()

    serving = asyncio.run_coroutine_threadsafe(serve(), loop)
    gw = asyncio.run_coroutine_threadsafe(asyncio.wait_for(ready, 10), loop).result(15)
    try:
        yield Live(gw, up)
    finally:
        loop.call_soon_threadsafe(stop.set)
        serving.result(15)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def send(port: int, head: bytes) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return int(reply.split(b" ", 2)[1])


PATH_PIECES = [
    "/", "/", "//", "api", "ADMIN", "admin", "x", ".", "..", "%2e", "%2E%2e", ";", ";v=1",
    "%41", "%7e", "%20", "%3f", "%25", "%252e", "%2f", "%c3%a9", "%ef%bc%8f", "admin.", "~",
    '"', "|", "[", "%0a",
]  # fmt: skip
HOSTS = [
    "t", "t", "t", "api.example.test", "T.", "api.example.test", "API.Example.Test:8443",
    "198.18.0.1:80", "[fd00::1]", "[fd00::1]:81", "a b", "user@api.example.test", "fd00::1",
    "t:", "t:99999", "", "api.example.test.:1",
]  # fmt: skip
AUTHORITIES = [None, None, "api.example.test", "t:8080", "API.example.test.", "[fd00::2]:9"]
QUERIES = ["", "?q=1", "?a=%2F&b", "?;x"]
_ids = itertools.count()


@given(
    pieces=st.lists(st.sampled_from(PATH_PIECES), max_size=8),
    host=st.sampled_from(HOSTS),
    authority=st.sampled_from(AUTHORITIES),
    scheme=st.sampled_from(["http", "HTTPS"]),
    query=st.sampled_from(QUERIES),
)
def test_the_upstream_receives_what_was_decided(
    live: Live, pieces: list[str], host: str, authority: str | None, scheme: str, query: str
) -> None:
    request_id = f"prop{next(_ids)}"
    path = "/" + "".join(pieces)
    target = path + query if authority is None else f"{scheme}://{authority}{path}{query}"
    head = (
        f"GET {target} HTTP/1.1\r\nHost: {host}\r\nX-Request-ID: {request_id}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    status = send(live.gateway.port, head)

    decided = [c for c in live.gateway.decided if c.request_id == request_id]
    received = [
        s
        for s in live.upstream.seen
        if ("X-Request-ID", request_id) in s["lines"]  # the gateway passes a valid id on
    ]
    if not received:
        event("refused")
        assert status != 200
        return
    event("forwarded, absolute form" if authority else "forwarded")
    (ctx,) = decided
    (seen,) = received
    assert status == 200
    # the path every stage saw, in origin form, and the query as sent
    assert seen["target"] == ctx.path + query
    assert seen["target"].startswith("/")
    # the Host it was routed by: the absolute-form authority wins over Host
    sent_authority = authority if authority is not None else host
    assert ctx.authority == sent_authority
    assert parse_authority(sent_authority) == ctx.host
    hosts = [v for k, v in seen["lines"] if k.lower() == "host"]
    assert hosts == [sent_authority]
    assert [v for k, v in seen["lines"] if k.lower() == "x-forwarded-host"] == [sent_authority]
    assert ctx.route is not None
    assert (ctx.route.name == "api") == (ctx.host == "api.example.test")
