"""One JSON line per request, to stderr or a file.

Never the Authorization header, cookies or the query string: only what an
operator needs to follow a request. Lines are block-buffered and flushed
every second (and at exit), so logging costs no system call per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from typing import TextIO

from stockade.proxy.context import RequestContext

BUFFER = 64 * 1024
FLUSH_INTERVAL = 1.0


class AccessLog:
    def __init__(self, target: str) -> None:
        if target == "-":
            # our own buffered writer on a copy of stderr: Python's stderr
            # is line-buffered, which would mean a write() per request
            self._out: TextIO = os.fdopen(os.dup(2), "w", buffering=BUFFER, encoding="utf-8")
        else:
            self._out = open(target, "a", buffering=BUFFER, encoding="utf-8")  # noqa: SIM115
        self._flusher: asyncio.Task[None] | None = None

    def write(self, ctx: RequestContext, method: str) -> None:
        record = {
            "time": round(time.time(), 3),
            "request_id": ctx.request_id,
            "client_ip": ctx.client_ip,
            "method": method,
            "path": ctx.path,
            "route": ctx.route.name if ctx.route else None,
            "status": ctx.status,
            "bytes_in": ctx.bytes_in,
            "bytes_out": ctx.bytes_out,
            "upstream": ctx.upstream or None,
            "upstream_time": None if ctx.upstream_time is None else round(ctx.upstream_time, 6),
            "total_time": round(time.monotonic() - ctx.started, 6),
            "decision": ctx.decision,
            "reason": ctx.reason or None,
        }
        self._out.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        with contextlib.suppress(OSError):  # a full disk must not stop the proxy
            self._out.flush()

    async def _flush_periodically(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.flush()

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_periodically())

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        self.flush()
        self._out.close()
