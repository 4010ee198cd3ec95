"""The HTTP -> HTTPS redirect listener."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from tls_harness import LOOPBACK, Served, read_response

from stockade.proxy.redirect import redirect_app, redirect_host


@pytest.mark.parametrize(
    ("header", "host"),
    [
        ("api.example.test", "api.example.test"),
        ("API.Example.Test:8080", "api.example.test"),
        ("api.example.test.", "api.example.test."),
        ("api.example.test:", "api.example.test"),
        ("my_host.internal", "my_host.internal"),
        ("198.18.0.1:80", "198.18.0.1"),
        ("[::1]", "[::1]"),
        ("[FD00:0:0::1]:8080", "[fd00::1]"),
        ("", None),
        ("evil.test/path", None),
        ("user@evil.test", None),
        ("evil.test:80:80", None),
        ("evil.test:8o", None),
        ("evil.test:123456", None),
        ("-bad.test", None),
        ("bad-.test", None),
        ("a..test", None),
        ("a b.test", None),
        ("é.test", None),
        ("x" * 64 + ".test", None),
        ("[::1", None),
        ("[not-v6]", None),
        ("[fe80::1%eth0]", None),
        ("[::1]x", None),
        ("::1", None),
    ],
)
def test_redirect_host(header: str, host: str | None) -> None:
    assert redirect_host(header) == host


def test_port_is_validated() -> None:
    with pytest.raises(ValueError, match="not a TCP port"):
        redirect_app(0)


@pytest.fixture(params=[8443, 443], ids=["port-8443", "port-443"])
def https_port(request: pytest.FixtureRequest) -> int:
    port: int = request.param
    return port


@pytest.fixture
def server(https_port: int) -> Iterator[Served]:
    with Served(redirect_app(https_port)) as served:
        yield served


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection((LOOPBACK, port), timeout=5) as sock:
        sock.sendall(request)
        return read_response(sock)


@pytest.mark.parametrize(
    ("method", "target", "host", "location"),
    [
        ("GET", "/", "api.example.test", "https://api.example.test{port}/"),
        (
            "GET",
            "/a/b?x=1&y=%2F",
            "api.example.test:80",
            "https://api.example.test{port}/a/b?x=1&y=%2F",
        ),
        ("HEAD", "/q?", "api.example.test", "https://api.example.test{port}/q"),  # empty query
        ("DELETE", "/%2e%2e/x", "Api.Example.Test", "https://api.example.test{port}/%2e%2e/x"),
        ("GET", "//evil.test/x", "api.example.test", "https://api.example.test{port}//evil.test/x"),
        ("GET", "/v6?q=1", "[::1]:8080", "https://[::1]{port}/v6?q=1"),
        ("GET", "/v4", "127.0.0.1:8080", "https://127.0.0.1{port}/v4"),
        # absolute-form: the path is kept, the authority in it is not trusted over Host
        ("GET", "http://evil.test/abs?x=1", "api.test", "https://api.test{port}/abs?x=1"),
        ("OPTIONS", "*", "api.example.test", "https://api.example.test{port}/"),
    ],
)
def test_redirects_to_https(
    server: Served, https_port: int, method: str, target: str, host: str, location: str
) -> None:
    request = f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    status, headers, body = exchange(server.port, request.encode())
    suffix = "" if https_port == 443 else f":{https_port}"
    assert status == 308
    assert headers["location"] == location.format(port=suffix)
    assert body == b""


def test_request_body_is_not_echoed(server: Served) -> None:
    request = (
        b"POST /login HTTP/1.1\r\nHost: api.example.test\r\nContent-Length: 15\r\n"
        b"Connection: close\r\n\r\nsecret=hunter2x"
    )
    status, headers, body = exchange(server.port, request)
    assert status == 308
    assert headers["location"].endswith("/login")
    assert b"hunter2" not in body
    assert headers["content-length"] == "0"


@pytest.mark.parametrize(
    "head",
    [
        "Host: evil.test/x",
        "Host: <script>",
        "Host: user@evil.test",
        "Host: [fe80::1%25eth0]",
        "Host: a.test\r\nHost: b.test",  # two Host headers
        "X-No-Host: 1",  # HTTP/1.1 without Host
    ],
)
def test_bad_host_is_400_and_not_reflected(server: Served, head: str) -> None:
    request = f"GET /x HTTP/1.1\r\n{head}\r\nConnection: close\r\n\r\n"
    status, headers, body = exchange(server.port, request.encode())
    assert status == 400
    assert "location" not in headers
    assert b"evil" not in body and b"script" not in body
