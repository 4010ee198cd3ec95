"""Controller-side cluster nodes without a kernel: BanService on dry-run maps + ClusterSync.

Each node has its own store, maps and single worker thread, as a controller
has, and syncs through a real Redis. Every node signs with one cluster key
(written 0600 next to the nodes' homes) unless the test says otherwise.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from stockade.clock import SystemClock
from stockade.cluster_settings import ClusterAuth, ClusterConfig
from stockade.controller.cluster import ClusterSync
from stockade.controller.cluster_auth import trust_from_config
from stockade.controller.maps import DryRunMaps
from stockade.controller.service import BanService
from stockade.controller.store import BanStore
from stockade.targets import parse_target

T = TypeVar("T")


def write_key(path: Path, secret: str | None = None) -> Path:
    """A cluster key file as an operator makes one (umask 077; openssl rand -hex 32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write((secret or secrets.token_hex(32)) + "\n")
    os.chmod(path, 0o600)
    return path


def cluster_key(home: Path) -> Path:
    """The key every node under `home` shares (made on first use)."""
    path = home / "cluster.key"
    return path if path.exists() else write_key(path)


def cluster_config(url: str, node: str, **extra: Any) -> ClusterConfig:
    settings: dict[str, Any] = {
        "backend": "redis",
        "url": url,
        "node": node,
        "heartbeat": 0.2,
        "retry_interval": 0.2,
        "timeout": 0.5,
    }
    settings.update(extra)
    return ClusterConfig(**settings)


class Node:
    def __init__(self, home: Path, name: str, url: str, **extra: Any) -> None:
        self.home = home / name
        self.name = name
        extra.setdefault("auth", ClusterAuth(key_file=cluster_key(home)))
        self.config = cluster_config(url, name, **extra)
        self.store = BanStore(self.home / "bans.db")
        self.maps = DryRunMaps()
        self.service = BanService(self.store, self.maps, SystemClock())
        self.worker = ThreadPoolExecutor(max_workers=1)
        self.sync: ClusterSync | None = None

    def _sync(self) -> ClusterSync:
        loop = asyncio.get_running_loop()
        return ClusterSync(
            self.config,
            self.service,
            lambda fn: loop.run_in_executor(self.worker, fn),
            self.home,
            trust_from_config(self.config),
        )

    async def start(self) -> None:
        self.sync = self._sync()
        await self.sync.start()

    async def stop(self) -> None:
        if self.sync is not None:
            await self.sync.stop()
            self.sync = None

    async def run(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn)

    async def ban(self, target: str, ttl: str | None = None) -> dict[str, Any]:
        return await self.run(lambda: self.service.ban(target, ttl, "test"))

    async def unban(self, target: str) -> dict[str, Any]:
        return await self.run(lambda: self.service.unban(target))

    def banned(self, target: str) -> bool:
        """In this node's maps (what its kernel would drop)."""
        return parse_target(target) in self.maps.bans()

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        self.store.close()


async def wait_for(check: Callable[[], bool], timeout: float = 3.0) -> float:
    """Poll until `check()` holds; the seconds it took (AssertionError after `timeout`)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - start
