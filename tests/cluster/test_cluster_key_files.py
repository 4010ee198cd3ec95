"""The real controller process with a cluster key it must not use: a clear error at start,
before anything changes, and the key never shown."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from cluster_nodes import write_key

from stockade.lab.redis_server import RedisServer

SECRET = "f00d" * 16
STOCKADE = [sys.executable, "-m", "stockade.cli.main"]


def controller_config(tmp: Path, url: str, auth: str) -> Path:
    config = tmp / "stockade.toml"
    config.write_text(
        f"""
[controller]
socket = "{tmp / "control.sock"}"
state_dir = "{tmp / "state"}"
pin_root = "{tmp / "bpf"}"
[controller.admin]
enabled = false
[cluster]
backend = "redis"
url = "{url}"
[cluster.auth]
{auth}
"""
    )
    return config


def run(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*STOCKADE, "--config", str(config), *args], capture_output=True, text=True, timeout=60
    )


def test_the_controller_refuses_a_key_file_others_may_read(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    key = write_key(tmp_path / "cluster.key", SECRET)
    os.chmod(key, 0o644)
    config = controller_config(tmp_path, redis_server.url(), f'key_file = "{key}"')
    result = run(config, "controller", "run")
    assert result.returncode == 1, result.stderr
    assert "cluster.auth.key_file" in result.stderr and "chmod 600" in result.stderr
    assert SECRET not in result.stderr + result.stdout
    assert not (tmp_path / "bpf").exists() and not (tmp_path / "state").exists()


def test_a_cluster_without_a_key_is_a_config_error(tmp_path: Path) -> None:
    config = controller_config(tmp_path, "redis://127.0.0.1:9/0", "")
    result = run(config, "check-config")
    assert result.returncode == 2, result.stderr
    assert "cluster.auth.key_file: required" in result.stderr
    assert "insecure_unauthenticated" in result.stderr
