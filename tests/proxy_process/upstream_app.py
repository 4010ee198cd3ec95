"""A test upstream for the process-level proxy tests (run as a subprocess).

    python upstream_app.py PORT

GET /health -> 200; GET /slow -> 200 after 2 s; GET /bytes/N streams N
bytes; anything else counts the
request body and answers {"body_size": N, "path": ...}.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


async def handle(request: web.Request) -> web.StreamResponse:
    tail = request.match_info["tail"]
    if tail == "slow":
        await asyncio.sleep(2)
    if tail.startswith("bytes/"):  # a streamed download of N bytes
        left = int(tail.split("/")[1])
        response = web.StreamResponse()
        response.content_length = left
        await response.prepare(request)
        block = b"y" * (1 << 20)
        while left:
            await response.write(block[: min(left, len(block))])
            left -= min(left, len(block))
        await response.write_eof()
        return response
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
    return web.json_response({"body_size": size, "path": request.raw_path})


def main() -> None:
    app = web.Application(client_max_size=2**40)
    app.router.add_route("*", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
