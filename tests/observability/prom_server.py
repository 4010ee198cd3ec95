"""A real Prometheus server (Debian's /usr/bin/prometheus) on loopback, for the tests.

It listens on a free 127.0.0.1 port, keeps its data in a temporary
directory, scrapes the given targets every second, and is stopped by its
PID when the block ends, also when a test failed.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

PROMETHEUS = "/usr/bin/prometheus"
START_TIMEOUT = 30.0


@dataclass
class Prometheus:
    url: str
    log: Path

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query; its result vector (every sample: metric labels and value)."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:  # a bad query: say which and why
            detail = exc.read().decode(errors="replace")
            exc.close()
            raise AssertionError(f"{expr!r}: {exc.code} {detail}") from None
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        """The value of a query that returns at most one sample."""
        result = self.query(expr)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, expected: float, timeout: float = 20) -> None:
        """Until `expr` evaluates to `expected` (the next scrapes must see it)."""
        deadline = time.monotonic() + timeout
        got = None
        while time.monotonic() < deadline:
            got = self.value(expr)
            if got == expected:
                return
            time.sleep(0.2)
        raise AssertionError(f"{expr} stayed {got}, expected {expected}:\n{self.log_tail()}")

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


def scrape_config(jobs: dict[str, list[str]]) -> str:
    """YAML (written as JSON, which YAML reads) scraping each job's targets every second."""
    return json.dumps(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": targets}]}
                for job, targets in jobs.items()
            ],
        },
        indent=2,
    )


@contextmanager
def running_prometheus(home: Path, port: int, jobs: dict[str, list[str]]) -> Iterator[Prometheus]:
    if shutil.which(PROMETHEUS) is None:
        hint = "run ./scripts/bootstrap (it installs the Debian package `prometheus`)"
        pytest.fail(f"no {PROMETHEUS}: {hint}", pytrace=False)
    home.mkdir(parents=True, exist_ok=True)
    config = home / "prometheus.yml"
    config.write_text(scrape_config(jobs))
    log = home / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Prometheus(f"http://127.0.0.1:{port}", log)
    try:
        _wait_ready(server, proc)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(server: Prometheus, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prometheus exited:\n{server.log_tail()}"
        try:
            with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"prometheus not ready in {START_TIMEOUT:.0f}s:\n{server.log_tail()}")


def wait_scraped(server: Prometheus, jobs: dict[str, list[str]], scrapes: int = 3) -> None:
    """Until every target is up and was scraped `scrapes` times (rates need two)."""
    for job in jobs:
        server.wait_for(f'min(up{{job="{job}"}})', 1)
        server.wait_for(f'min(count_over_time(up{{job="{job}"}}[1m])) >= bool {scrapes}', 1)
