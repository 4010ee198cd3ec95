"""The status page reloads itself in a real browser (its meta refresh), and stops when
told to; served by the admin listener on loopback from made-up numbers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from chromium_headless import open_page

from stockade.admin_http import AdminConfig, AdminServer, Page
from stockade.control_client import ControllerUnavailable
from stockade.proxy.status_page import StatusPage
from stockade.stats_view import KernelSample

EXPOSITION = b"""\
# TYPE stockade_proxy_requests_total counter
stockade_proxy_requests_total{route="api",method="GET",status="2xx",decision="allowed"} 3.0
"""


class Views:
    """The page, counting how often it was asked for."""

    def __init__(self) -> None:
        self.count = 0
        self.changed = threading.Condition()

        def down() -> KernelSample:
            raise ControllerUnavailable("the controller is not running")

        self.page = StatusPage(lambda: EXPOSITION, down, "test")

    def render(self, query: str) -> bytes:
        body = self.page.render(query)
        with self.changed:
            self.count += 1
            self.changed.notify_all()
        return body

    def wait_for(self, count: int, timeout: float) -> int:
        with self.changed:
            self.changed.wait_for(lambda: self.count >= count, timeout)
            return self.count


@pytest.fixture
def served() -> Iterator[tuple[Views, str]]:
    views = Views()
    page = Page(views.render, "text/html; charset=utf-8")
    server = AdminServer(AdminConfig(address="127.0.0.1", port=0), lambda: b"", {"/status": page})
    server.start()
    try:
        yield views, f"http://127.0.0.1:{server.port}/status"
    finally:
        server.stop()


def test_the_page_reloads_itself(served: tuple[Views, str], tmp_path: Path) -> None:
    views, url = served
    with open_page(tmp_path / "profile", url + "?refresh=1"):
        seen = views.wait_for(3, timeout=20)  # 1 s apart: about 2 s after the first
    assert seen >= 3


def test_refresh_0_stops_it(served: tuple[Views, str], tmp_path: Path) -> None:
    views, url = served
    with open_page(tmp_path / "profile", url + "?refresh=0"):
        assert views.wait_for(1, timeout=20) == 1
        time.sleep(2.5)  # what a refresh of 1 s would have reloaded twice in
        assert views.count == 1
