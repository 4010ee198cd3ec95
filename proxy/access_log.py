"""One JSON line per request, to stderr or a file.

Never the Authorization header, cookies or the query string: only what an
operator needs to follow a request (and what `stockade replay` replays:
time, client, method, host, path, consumer, status, decision, and what the WAF
found: `waf`, see proxy/waf/findings.py). Lines are block-buffered and flushed
every second (and at exit), so logging costs no system call per request.

Fields are named as in the JSON application logs (stockade/logs.py): `time`
in RFC 3339 UTC, `logger` ("stockade.access", which tells these lines from
the others when both go to stderr), `pid`, and `request_id`, `client_ip`,
`route` as the proxy's log lines name them; no `level` or `message`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import time
from typing import TextIO

from stockade.logs import rfc3339
from stockade.proxy.context import RequestContext

BUFFER = 64 * 1024
LOGGER = "stockade.access"
FLUSH_INTERVAL = 1.0


@functools.cache
def _json_name(name: str) -> str:
    return json.dumps(name)


# Hosts and consumers come from clients: a bounded cache of their JSON form.
_json_text = functools.lru_cache(maxsize=4096)(json.dumps)
_compact = functools.partial(json.dumps, separators=(",", ":"))


class AccessLog:
    def __init__(self, target: str) -> None:
        if target == "-":
            # our own buffered writer on a copy of stderr: Python's stderr
            # is line-buffered, which would mean a write() per request
            self._out: TextIO = os.fdopen(os.dup(2), "w", buffering=BUFFER, encoding="utf-8")
        else:
            self._out = open(target, "a", buffering=BUFFER, encoding="utf-8")  # noqa: SIM115
        self._flusher: asyncio.Task[None] | None = None
        # made in the worker, after the fork: its own pid
        self._head = f'"logger":"{LOGGER}","pid":{os.getpid()}'

    def write(self, ctx: RequestContext, method: str) -> None:
        # Formatted by hand: json.dumps of a dict was a tenth of a request's
        # CPU. Every string here is JSON-safe by construction (a validated
        # request id, an IP, an HTTP token, a normalized path with unsafe
        # characters percent-encoded, fixed reason codes, host:port) except
        # the route's name from the config, which is escaped once.
        route = ctx.route
        route_json = _json_name(route.name) if route else "null"
        upstream = f'"{ctx.upstream}"' if ctx.upstream else "null"
        up_time = "null" if ctx.upstream_time is None else f"{ctx.upstream_time:.6f}"
        reason = f'"{ctx.reason}"' if ctx.reason else "null"
        consumer = _json_text(ctx.consumer) if ctx.consumer is not None else "null"
        # only on a request the WAF flagged: rule ids, variable names, points (no values)
        waf = "" if ctx.waf_record is None else ',"waf":' + _compact(ctx.waf_record)
        self._out.write(
            f'{{"time":"{rfc3339(time.time())}",{self._head},"request_id":"{ctx.request_id}",'
            f'"client_ip":"{ctx.client_ip}","method":"{method}","host":{_json_text(ctx.host)},'
            f'"path":"{ctx.path}","consumer":{consumer},'
            f'"route":{route_json},"status":{ctx.status},"bytes_in":{ctx.bytes_in},'
            f'"bytes_out":{ctx.bytes_out},"upstream":{upstream},"upstream_time":{up_time},'
            f'"total_time":{time.monotonic() - ctx.started:.6f},"decision":"{ctx.decision}",'
            f'"reason":{reason}{waf}}}\n'
        )

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
