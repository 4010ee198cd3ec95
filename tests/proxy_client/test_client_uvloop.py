"""The workers run uvloop, whose transports are not asyncio.Transport subclasses."""

from __future__ import annotations

import asyncio

import uvloop
from aiohttp import web

from stockade.proxy.upstream_client import UpstreamPool


def test_a_request_under_uvloop() -> None:
    async def scenario() -> None:
        async def hello(_: web.Request) -> web.Response:
            return web.Response(text="hi")

        app = web.Application()
        app.router.add_get("/", hello)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pool = UpstreamPool("127.0.0.1", port)
        try:
            for _ in range(3):  # the second and third reuse the connection
                response = await pool.request("GET", "/", [("Host", "t")])
                assert response.status == 200
                assert await response.read() == b"hi"
                response.release()
            assert pool.idle_count == 1
        finally:
            await pool.close()
            await runner.cleanup()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())
