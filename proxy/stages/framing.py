"""Stage: refuse ambiguous message framing (request smuggling) before anything else."""

from __future__ import annotations

from aiohttp import web
from aiohttp.typedefs import Handler

from stockade.proxy.errors import Refusal
from stockade.proxy.smuggling import framing_problem


@web.middleware
async def framing_stage(request: web.Request, handler: Handler) -> web.StreamResponse:
    problem = framing_problem(
        request.raw_headers, version=(request.version.major, request.version.minor)
    )
    if problem is not None:
        # The bytes after a request we cannot frame must never be read as the next request.
        refusal = Refusal(400, "framing", problem, "ambiguous request framing")
        refusal.close_connection = True
        raise refusal
    return await handler(request)
