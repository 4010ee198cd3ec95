"""Stage: refuse ambiguous message framing (request smuggling) and a second
value of a header the gateway decides on, before anything else."""

from __future__ import annotations

from collections.abc import Collection

from aiohttp.web_request import BaseRequest

from stockade.proxy.context import RequestContext
from stockade.proxy.errors import Refusal
from stockade.proxy.pipeline_types import Stage
from stockade.proxy.smuggling import framing_problem


def framing_stage(single_valued: Collection[bytes] = frozenset()) -> Stage:
    """`single_valued`: lowercase names (proxy.headers.single_valued_headers)."""

    def stage(request: BaseRequest, ctx: RequestContext) -> None:
        version = request.version
        problem = framing_problem(
            request.raw_headers, version=(version.major, version.minor), single_valued=single_valued
        )
        if problem is None:
            return
        if problem == "duplicate_header":
            # The framing is sound; the upstream might read a value we did not check.
            raise Refusal(400, "header", problem, "a header the gateway checks is sent twice")
        # The bytes after a request we cannot frame must never be read as the next request.
        refusal = Refusal(400, "framing", problem, "ambiguous request framing")
        refusal.close_connection = True
        raise refusal

    return stage
