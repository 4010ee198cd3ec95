"""The per-request context every stage reads and fills in."""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass, field

from aiohttp import web

from stockade.proxy.settings import Route

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Decisions, one per request, as logged and counted.
ALLOWED = "allowed"
UPSTREAM_ERROR = "upstream_error"


@dataclass(slots=True)
class RequestContext:
    request_id: str
    client_ip: str  # the real client: the peer, or what a trusted proxy says
    peer_ip: str
    peer_trusted: bool  # the peer is a trusted proxy: its X-Forwarded-For is believed
    scheme: str
    started: float = field(default_factory=time.monotonic)
    path: str = ""  # the one normalized path every stage and the upstream see
    route: Route | None = None
    decision: str = ALLOWED
    reason: str = ""
    status: int = 0
    upstream: str = ""
    upstream_time: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0


CTX_KEY = web.RequestKey("stockade_ctx", RequestContext)


def request_id_from(value: str | None) -> str:
    """Pass a well-formed X-Request-ID through; otherwise make a new one."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return uuid.uuid4().hex


def context(request: web.Request) -> RequestContext:
    return request[CTX_KEY]
