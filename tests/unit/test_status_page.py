"""The status page without a browser: what it shows from given samples (escaped), rates
against an earlier view on an injected clock, the controller or the metrics away, and how
the admin listener serves it (read-only, behind its credentials)."""

from __future__ import annotations

import base64
import http.client
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from stockade.admin_http import AdminConfig, AdminServer, Page
from stockade.control_client import ControllerUnavailable
from stockade.proxy.status_page import (
    HEADERS,
    MAX_WINDOW,
    REFRESH,
    StatusPage,
    refresh_seconds,
)
from stockade.stats_view import KernelSample

HOSTILE = "<img src=x onerror=alert(1)>&\"'"


def label(value: str) -> str:
    """A label value in the exposition format."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(ok: int, slow: int, route: str = "api", pool: str = "api", up: int = 1) -> bytes:
    """`ok` requests under 10 ms and `slow` between 0.1 s and 1 s, on one route."""
    total = ok + slow
    route, pool = label(route), label(pool)
    labels = f'route="{route}",method="GET"'
    return f"""\
# TYPE stockade_proxy_requests_total counter
stockade_proxy_requests_total{{{labels},status="2xx",decision="allowed"}} {ok}
stockade_proxy_requests_total{{{labels},status="4xx",decision="ratelimit"}} {slow}
# TYPE stockade_proxy_request_duration_seconds histogram
stockade_proxy_request_duration_seconds_bucket{{route="{route}",le="0.01"}} {ok}
stockade_proxy_request_duration_seconds_bucket{{route="{route}",le="0.1"}} {ok}
stockade_proxy_request_duration_seconds_bucket{{route="{route}",le="1.0"}} {total}
stockade_proxy_request_duration_seconds_bucket{{route="{route}",le="+Inf"}} {total}
stockade_proxy_request_duration_seconds_count{{route="{route}"}} {total}
stockade_proxy_request_duration_seconds_sum{{route="{route}"}} 1.0
# TYPE stockade_proxy_upstream_up gauge
stockade_proxy_upstream_up{{pool="{pool}",server="198.18.1.10:8080"}} {up}
""".encode()


def kernel(reason: str = "scanner", drops: int = 0) -> KernelSample:
    return KernelSample(
        {"pass": (100, 6400), "drop_ban": (drops, drops * 64)},
        [
            {
                "target": "198.18.0.7",
                "source": "cli",
                "reason": reason,
                "packets": drops,
                "ttl_remaining": 90.0,
            }
        ],
        {"pid": 42, "version": "1.0", "monitor": False, "interfaces": [], "bans": {"total": 1}},
    )


class Parsed(HTMLParser):
    """Tags, text by element id, and table rows by table id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.metas: list[dict[str, str]] = []
        self.rows: dict[str, list[list[str]]] = {}
        self.texts: dict[str, str] = {}
        self._table = ""
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self._open: list[tuple[str, str]] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        found = {k: v or "" for k, v in attrs}
        if tag == "meta":
            self.metas.append(found)
        if "id" in found:
            self._open.append((tag, found["id"]))
            self.texts[found["id"]] = ""
        if tag == "table":
            self._table = found["id"]
            self.rows[self._table] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            self._open.pop()
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows[self._table].append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)
        for _, ident in self._open:
            self.texts[ident] += data


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def page_with(
    scrape: list[bytes], kernel_sample: KernelSample | None = None
) -> tuple[StatusPage, Clock]:
    """A page whose proxy says scrape[0] (change it between views) and whose controller
    says `kernel_sample`, or is down when it is None."""
    clock = Clock()

    def read_kernel() -> KernelSample:
        if kernel_sample is None:
            raise ControllerUnavailable("the controller is not running (no socket at /x.sock)")
        return kernel_sample

    return StatusPage(lambda: scrape[0], read_kernel, "9.9", clock=clock, wall=lambda: 0.0), clock


def view(page: StatusPage, query: str = "") -> Parsed:
    return Parsed(page.render(query).decode())


def test_everything_from_the_config_or_a_client_is_text() -> None:
    page, _ = page_with([exposition(3, 1, route=HOSTILE, pool=HOSTILE)], kernel(HOSTILE, 5))
    body = page.render("").decode()
    assert HOSTILE not in body and "<img" not in body
    parsed = Parsed(body)
    assert "img" not in parsed.tags and "script" not in parsed.tags
    ban = parsed.rows["bans-top"][1]
    assert ban == ["198.18.0.7", "cli", "5", "-", "in 1m30s", HOSTILE]  # shown, as text
    assert parsed.rows["routes"][1][0] == HOSTILE
    assert parsed.rows["upstreams"][1][:3] == [HOSTILE, "198.18.1.10:8080", "UP"]


def test_the_first_view_has_totals_and_latency_since_start() -> None:
    page, _ = page_with([exposition(9, 1)], kernel(drops=3))
    parsed = view(page)
    assert parsed.rows["reasons"][1:] == [
        ["pass", "pass", "100", "6400", "-"],
        ["drop_ban", "drop", "3", "192", "-"],
    ]
    # route, req/s, requests, 2xx, 3xx, 4xx, 5xx, p50, p99: over the whole histogram
    assert parsed.rows["routes"][1] == ["api", "-", "10", "9", "0", "1", "0", "5.6ms", "910.0ms"]
    assert parsed.rows["routes"][2][0] == "(all)"  # the footer
    assert parsed.rows["decisions"][1:] == [["allowed", "-", "9"], ["ratelimit", "-", "1"]]
    assert "since the proxy started" in parsed.texts["routes-title"]
    assert parsed.texts["controller"] == (
        "controller: pid 42, version 1.0, enforcing; interfaces: none; bans: 1"
    )
    assert {"http-equiv": "refresh", "content": str(REFRESH)} in parsed.metas


def test_rates_and_latency_are_over_the_time_since_an_earlier_view() -> None:
    scrape = [exposition(10, 0)]
    page, clock = page_with(scrape, kernel(drops=0))
    view(page)
    clock.now += 0.5  # too soon to compare with: still totals only
    scrape[0] = exposition(11, 0)
    assert view(page).rows["routes"][1][1] == "-"
    clock.now += 1.5  # 2 s after the first view
    scrape[0] = exposition(20, 10)
    parsed = view(page)
    # against the second view, the newest old enough: 9 fast and 10 slow more in 1.5 s
    row = parsed.rows["routes"][1]
    assert row == ["api", "12.7", "30", "20", "0", "10", "0", "145.0ms", "982.9ms"]
    assert "over the last 1.5 s" in parsed.texts["routes-title"]
    clock.now += MAX_WINDOW + 1  # every kept view is too old now
    assert view(page).rows["routes"][1][1] == "-"


def test_the_controller_away_is_said_and_the_proxy_still_shown() -> None:
    page, _ = page_with([exposition(1, 0)], None)
    parsed = view(page)
    assert parsed.texts["controller"].startswith(
        "controller: the controller is not running (no socket at /x.sock); start it with"
    )
    assert "reasons" not in parsed.rows and "bans-top" not in parsed.rows
    assert parsed.rows["routes"][1][2] == "1"


def test_metrics_that_do_not_parse_are_said() -> None:
    page, _ = page_with([b"this is not { an exposition"], kernel())
    parsed = view(page)
    assert parsed.texts["proxy"].startswith("proxy: cannot read the metrics")
    assert "routes" not in parsed.rows and "reasons" in parsed.rows


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", REFRESH),
        ("refresh=0", 0),
        ("refresh=30", 30),
        ("refresh=abc", REFRESH),
        ("refresh=-1", REFRESH),
        ("refresh=99999", REFRESH),
        ("refresh=1&refresh=2", REFRESH),
    ],
)
def test_refresh_from_the_query(query: str, expected: int) -> None:
    assert refresh_seconds(query) == expected


def test_refresh_0_stops_refreshing() -> None:
    page, _ = page_with([exposition(1, 0)], kernel())
    parsed = view(page, "refresh=0")
    assert not any(m.get("http-equiv") == "refresh" for m in parsed.metas)


# -- on the admin listener ---------------------------------------------------------------
@contextmanager
def listener(tmp_path: Path, render: Page) -> Iterator[int]:
    token, password = tmp_path / "token", tmp_path / "password"
    token.write_text("t0ken\n")
    password.write_text("pw\n")
    config = AdminConfig(
        address="127.0.0.1",
        port=0,
        bearer_token_file=token,
        basic_auth_user="ops",
        basic_auth_password_file=password,
    )
    server = AdminServer(config, lambda: b"# metrics\n", {"/status": render, "/": render})
    server.start()
    try:
        yield server.port
    finally:
        server.stop()


def request(
    port: int, method: str, path: str, auth: str | None = "Bearer t0ken"
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Authorization": auth} if auth else {}
        conn.request(
            method, path, body=b"x" if method in ("POST", "PUT") else None, headers=headers
        )
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def test_the_listener_serves_the_page_read_only_behind_its_credentials(tmp_path: Path) -> None:
    page, _ = page_with([exposition(1, 0)], kernel())
    with listener(tmp_path, page.page()) as port:
        status, headers, body = request(port, "GET", "/status?refresh=10")
        assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
        assert {(k, headers[k]) for k, _ in HEADERS} == set(HEADERS)
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
        assert b'content="10"' in body
        basic = "Basic " + base64.b64encode(b"ops:pw").decode()
        assert request(port, "GET", "/", basic)[0] == 200
        for auth in (None, "Bearer nope", "Basic " + base64.b64encode(b"ops:no").decode()):
            status, headers, body = request(port, "GET", "/status", auth)
            assert (status, body) == (401, b"")
        challenge = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        challenge.request("GET", "/status")
        offered = challenge.getresponse().headers.get_all("WWW-Authenticate")
        challenge.close()
        assert offered == [
            'Bearer realm="stockade-admin"',
            'Basic realm="stockade-admin", charset="UTF-8"',
        ]

        status, headers, body = request(port, "HEAD", "/status")
        assert status == 200 and body == b"" and int(headers["Content-Length"]) > 1000
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            status, headers, _ = request(port, method, "/status")
            assert (status, headers.get("Allow")) == (405, "GET, HEAD"), method
        assert request(port, "POST", "/metrics")[0] == 405
        status, _, body = request(port, "GET", "/nope")
        assert (status, body) == (404, b"not found: try /metrics or /status\n")
        status, headers, body = request(port, "GET", "/metrics")  # as before
        assert status == 200 and headers["Content-Type"] == CONTENT_TYPE_LATEST
        assert body == b"# metrics\n"


def test_a_page_that_fails_is_a_500_and_the_listener_goes_on(tmp_path: Path) -> None:
    calls = []

    def render(query: str) -> bytes:
        calls.append(urllib.parse.parse_qs(query))
        if len(calls) == 1:
            raise RuntimeError("boom")
        return b"<p>fine</p>"

    with listener(tmp_path, Page(render, "text/html")) as port:
        assert request(port, "GET", "/status?a=1")[0] == 500
        assert request(port, "GET", "/status")[:3:2] == (200, b"<p>fine</p>")
    assert calls[0] == {"a": ["1"]}
