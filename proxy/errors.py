"""Refusals: a stage raises one, the pipeline answers it as JSON and counts it."""

from __future__ import annotations

import json

from aiohttp import web

SERVER = "stockade"


class Refusal(Exception):
    """Stop the request here with `status`; `reason` is a stable code for logs and metrics."""

    def __init__(self, status: int, decision: str, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.decision = decision
        self.reason = reason
        self.message = message
        self.headers: dict[str, str] = {}
        self.close_connection = False


def error_response(
    status: int, reason: str, message: str, request_id: str, headers: dict[str, str] | None = None
) -> web.Response:
    body = json.dumps(
        {"error": reason, "message": message, "request_id": request_id}, separators=(",", ":")
    )
    response = web.Response(
        status=status, text=body, content_type="application/json", headers=headers
    )
    response.headers["X-Request-ID"] = request_id
    response.headers["Server"] = SERVER  # not aiohttp's banner with its version
    return response
