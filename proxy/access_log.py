"""One JSON line per request, to stderr or a file.

Never the Authorization header, cookies or the query string's values: only
what an operator needs to follow a request.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TextIO

from stockade.proxy.context import RequestContext


class AccessLog:
    def __init__(self, target: str) -> None:
        self._own = target != "-"
        self._out: TextIO = (
            open(target, "a", buffering=1, encoding="utf-8") if self._own else sys.stderr  # noqa: SIM115
        )

    def write(self, ctx: RequestContext, method: str) -> None:
        now = time.time()
        record = {
            "time": round(now, 3),
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

    def close(self) -> None:
        if self._own:
            self._out.close()
