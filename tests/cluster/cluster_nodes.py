"""Controller-side cluster nodes without a kernel: BanService on dry-run maps + ClusterSync.

Each node has its own store, maps and single worker thread, as a controller
has, and syncs through a real Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from stockade.clock import SystemClock
from stockade.cluster_settings import ClusterConfig
from stockade.controller.cluster import ClusterSync
from stockade.controller.maps import DryRunMaps
from stockade.controller.service import BanService
from stockade.controller.store import BanStore
from stockade.targets import parse_target

T = TypeVar("T")


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
