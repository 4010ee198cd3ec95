"""Stage: refuse ambiguous message framing (request smuggling) before anything else."""

from __future__ import annotations

from aiohttp.web_request import BaseRequest

from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.smuggling import framing_problem


def framing_stage(request: BaseRequest, ctx: RequestContext) -> None:
    version = request.version
    problem = framing_problem(request.raw_headers, version=(version.major, version.minor))
    if problem is not None:
        # The bytes after a request we cannot frame must never be read as the next request.
        refusal = Refusal(400, "framing", problem, "ambiguous request framing")
        refusal.close_connection = True
        raise refusal
