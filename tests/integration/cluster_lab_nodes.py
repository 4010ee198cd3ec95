"""Three lab gateways (one lab each) whose controllers share one Redis.

Each lab is a full topology with its own namespaces; the addresses repeat
from lab to lab, but no two labs are connected, so the client address
198.18.0.10 exists once per lab and a cluster ban on it must drop it on
every gateway. Redis listens on a unix socket (a path works from every
network namespace).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from controller_harness import (
    STOCKADE,
    RunningController,
    start,
    stop,
    wait_ready,
    write_config,
)

from stockade.lab.redis_server import RedisServer
from stockade.lab.topology import Lab


@dataclass
class Node:
    name: str
    lab: Lab
    ctl: RunningController


def cluster_section(name: str, url: str, key: Path) -> str:
    return (
        "[cluster]\n"
        'backend = "redis"\n'
        f'url = "{url}"\n'
        f'node = "{name}"\n'
        'heartbeat = "250ms"\n'
        'retry_interval = "250ms"\n'
        "[cluster.auth]\n"
        f'key_file = "{key}"\n'
    )


def write_cluster_key(path: Path) -> Path:
    """The key the nodes sign ban events with: 0600, as the controller requires."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32) + "\n")
    return path


@contextmanager
def cluster_controller(
    tmp: Path, name: str, lab: Lab, url: str, key: Path
) -> Iterator[RunningController]:
    """`stockade controller run` on the lab's gateway, in cluster mode."""
    home = tmp / name
    home.mkdir()
    pin_root = Path(f"/sys/fs/bpf/stockade-cl-{lab.prefix}")
    config_path = home / "stockade.toml"
    write_config(config_path, home, pin_root, lab.gateway_ns, lab.gateway_if, mode="native")
    with config_path.open("a") as out:
        out.write(cluster_section(name, url, key))
    log_path = home / "controller.log"
    proc = start(config_path, log_path)
    ctl = RunningController(config_path, home / "control.sock", pin_root / "v1", log_path, proc)
    try:
        wait_ready(ctl.socket, proc, log_path)
        yield ctl
    finally:
        stop(ctl.proc)
        subprocess.run(
            [*STOCKADE, "--config", str(config_path), "detach", "--all", "--remove-maps"],
            capture_output=True,
            timeout=30,
        )
        shutil.rmtree(pin_root, ignore_errors=True)


@contextmanager
def cluster_of_three(tmp: Path, labs: list[Lab], redis: RedisServer) -> Iterator[list[Node]]:
    key = write_cluster_key(tmp / "cluster.key")
    with ExitStack() as stack:
        nodes = []
        for name, lab in zip(("a", "b", "c"), labs, strict=True):
            ctl = stack.enter_context(cluster_controller(tmp, name, lab, redis.url(), key))
            nodes.append(Node(name, lab, ctl))
        yield nodes
