"""Each worker publishes its state to a small JSON file; `stockade status` reads them.

Files live in proxy.status_dir (default /run/stockade/proxy), one per worker,
rewritten atomically every second. The master removes the directory's stale
files at start and a worker's file when it exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from stockade.proxy.limits import LimitCounters
from stockade.proxy.upstream import PoolState

INTERVAL = 1.0
MASTER_FILE = "master.json"  # the master's pid, for `stockade reload`
RELOAD_FILE = "reload.json"  # how the master's last reload went
log = logging.getLogger("stockade.proxy")


def worker_file(status_dir: Path, index: int) -> Path:
    return status_dir / f"worker-{index}.json"


def write_atomically(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, separators=(",", ":")))
    os.replace(tmp, path)


class StatusPublisher:
    def __init__(
        self,
        path: Path,
        index: int,
        pools: dict[str, PoolState],
        counters: LimitCounters,
        auth_failures: Mapping[str, int],
        rate_limited: Mapping[str, int] | None = None,
        anomaly: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.path = path
        self.index = index
        self.pools = pools
        self.counters = counters
        self.auth_failures = auth_failures
        self.rate_limited = rate_limited if rate_limited is not None else {}
        self.anomaly = anomaly
        self.started = time.time()
        self._task: asyncio.Task[None] | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "worker": self.index,
            "pid": os.getpid(),
            "started": self.started,
            "updated": time.time(),
            "pools": {name: state.snapshot() for name, state in self.pools.items()},
            "limits": asdict(self.counters),
            "auth_failures": dict(self.auth_failures),
            "rate_limited": dict(self.rate_limited),
            "anomaly": self.anomaly() if self.anomaly is not None else {},
        }

    async def _run(self) -> None:
        warned = False
        while True:
            try:
                write_atomically(self.path, self.snapshot())
            except OSError as exc:  # status is a convenience: never stop serving for it
                if not warned:
                    log.warning("cannot write proxy status to %s: %s", self.path, exc.strerror)
                    warned = True
            await asyncio.sleep(INTERVAL)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def read_status(status_dir: Path, max_age: float = 10.0) -> list[dict[str, Any]]:
    """Every live worker's last snapshot (a file older than max_age is a dead worker's)."""
    workers = []
    now = time.time()
    for path in sorted(status_dir.glob("worker-*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if now - float(data.get("updated", 0)) <= max_age:
            workers.append(data)
    return workers


def clear(status_dir: Path) -> None:
    for path in status_dir.glob("worker-*.json"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
