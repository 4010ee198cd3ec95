"""Fixtures for the cluster tests: a real redis-server per test, in the test's temp dir."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from stockade.lab.redis_server import RedisServer, running_redis

PASSWORD = "cluster-test-secret"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """redis-server with a password, on a unix socket (and a loopback port), stopped by PID."""
    with running_redis(tmp_path / "redis", PASSWORD, tcp=True) as server:
        yield server
