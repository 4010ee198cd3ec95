"""The real proxy process with a wrong Redis password: a clear error at start, exit 1."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from cluster_nodes import cluster_key

from stockade.lab.redis_server import RedisServer, free_port


def test_proxy_refuses_to_start_with_a_wrong_redis_password(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    config = tmp_path / "stockade.toml"
    config.write_text(
        f"""
[cluster]
backend = "redis"
url = "{redis_server.url(password="not-it-7")}"
[cluster.auth]
key_file = "{cluster_key(tmp_path)}"
[proxy]
status_dir = "{tmp_path / "status"}"
metrics_dir = "{tmp_path / "metrics"}"
workers = 1
[proxy.admin]
enabled = false
[proxy.rate_limiting.limits.global]
rate = "100/min"
all_routes = true
scope = "cluster"
[[proxy.listeners]]
address = "127.0.0.1"
port = {free_port()}
[proxy.pools.api]
servers = ["127.0.0.1:9"]
[[proxy.routes]]
pool = "api"
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", "--config", str(config), "proxy", "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "refused the password" in result.stderr
    assert "not-it-7" not in result.stderr


def test_controller_refuses_to_start_with_a_wrong_redis_password(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    pin_root = tmp_path / "bpf"  # never reached: the check comes before anything changes
    config = tmp_path / "stockade.toml"
    config.write_text(
        f"""
[controller]
socket = "{tmp_path / "control.sock"}"
state_dir = "{tmp_path / "state"}"
pin_root = "{pin_root}"
[controller.admin]
enabled = false
[cluster]
backend = "redis"
url = "{redis_server.url(password="not-it-7")}"
[cluster.auth]
key_file = "{cluster_key(tmp_path)}"
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "stockade.cli.main", "--config", str(config), "controller", "run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1, result.stderr
    assert "refused the password" in result.stderr and "not-it-7" not in result.stderr
    assert not pin_root.exists() and not (tmp_path / "state").exists()
