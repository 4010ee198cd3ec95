"""An upstream for the proxy lab tests: GET /health, and JSON naming its own port.

python lab_upstream.py PORT     (prints "ready PORT" once it listens)
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web


async def main(port: int) -> None:
    async def handle(request: web.Request) -> web.Response:
        return web.json_response({"port": port, "path": request.raw_path})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    print(f"ready {port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    import signal

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
