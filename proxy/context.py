"""The per-request context every stage reads and fills in."""

from __future__ import annotations

import itertools
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stockade.proxy.settings import Route

if TYPE_CHECKING:
    from stockade.proxy.limits import BodyPace
    from stockade.proxy.ratelimit import Tightest

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

# Decisions, one per request, as logged and counted.
ALLOWED = "allowed"
UPSTREAM_ERROR = "upstream_error"
CLIENT_ABORT = "client_abort"  # the client closed its connection; logged with status 499
CLIENT_ABORT_STATUS = 499  # nginx's "client closed request": never sent, only logged

# When a client aborted (the reason logged with CLIENT_ABORT).
DURING_REQUEST_BODY = "during_request_body"  # its body was not complete yet
BEFORE_RESPONSE = "before_response"  # the request was whole; no response head sent yet
DURING_RESPONSE = "during_response"  # the response was being sent


class ClientAborted(Exception):
    """The client went away mid-request: its doing, never counted against an upstream."""

    def __init__(self, phase: str, message: str = "client closed the connection") -> None:
        super().__init__(message)
        self.phase = phase


@dataclass(slots=True)
class RequestContext:
    request_id: str
    client_ip: str  # the real client: the peer, or what a trusted proxy says
    peer_ip: str
    peer_trusted: bool  # the peer is a trusted proxy: its X-Forwarded-For is believed
    scheme: str
    started: float = field(default_factory=time.monotonic)
    path: str = ""  # the one normalized path every stage and the upstream see
    host: str = ""  # the routed host: lowercase, without port or trailing dot
    authority: str = ""  # host[:port] as sent (Host, or an absolute-form target's): upstream Host
    # The request target in origin form, as sent: the raw target itself, or an absolute-form
    # target's path and query (what the WAF inspects; "" until the path stage has run)
    origin_target: str = ""
    route: Route | None = None
    decision: str = ALLOWED
    reason: str = ""
    status: int = 0
    upstream: str = ""
    upstream_time: float | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    consumer: str | None = None  # who authenticated: JWT sub or the API key's consumer
    plan: str | None = None
    auth_headers: list[tuple[str, str]] = field(default_factory=list)  # set upstream
    api_key_id: str | None = None
    scopes: frozenset[str] | None = None  # a verified JWT's scopes; None: no JWT verified
    response_headers: list[tuple[str, str]] = field(default_factory=list)  # set on the answer
    tightest: Tightest | None = None  # the rate limit closest to refusing
    body_read: bytes = b""  # what a stage (the WAF) read of the body: forwarded first
    body: BodyPace | None = None  # the request body's progress; None: no body
    waf_record: dict[str, Any] | None = None  # the WAF's matches, for the access log


class RequestIds:
    """Unique ids without a syscall per request: a random per-process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:16]
        self._next = itertools.count(1).__next__

    def new(self) -> str:
        return f"{self._prefix}{self._next():016x}"


_IDS = RequestIds()


def reset_request_ids() -> None:
    """After fork: a worker must not share its parent's prefix."""
    global _IDS
    _IDS = RequestIds()


def request_id_from(value: str | None) -> str:
    """Pass a well-formed X-Request-ID through; otherwise make a new one."""
    if value and _REQUEST_ID.fullmatch(value):
        return value
    return _IDS.new()
