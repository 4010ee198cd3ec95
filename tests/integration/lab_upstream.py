"""An upstream for the proxy lab tests: GET /health, and JSON naming its own port.

python lab_upstream.py PORT     (prints "ready PORT" once it listens)

start(lab, PORT) runs it in the lab's upstream namespace and returns once it listens.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from aiohttp import web

from stockade.lab.netns_exec import popen_in_netns, python_argv
from stockade.lab.topology import Lab


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


def start(lab: Lab, port: int) -> subprocess.Popen[str]:
    """This upstream on PORT in the lab's upstream namespace, listening; the caller stops it."""
    proc = popen_in_netns(
        lab.upstream_ns, python_argv(str(Path(__file__)), str(port)), stdout=subprocess.PIPE
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("ready")
    return proc


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
