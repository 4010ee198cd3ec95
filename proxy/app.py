"""One worker's aiohttp application: the pipeline in front of the forwarder."""

from __future__ import annotations

from aiohttp import web

from stockade.clock import Clock
from stockade.proxy.access_log import AccessLog
from stockade.proxy.context import RequestContext
from stockade.proxy.forward import Forwarder, Upstreams
from stockade.proxy.health import HealthChecker
from stockade.proxy.pipeline import stages
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.upstream import PoolState

UPSTREAMS = web.AppKey("upstreams", Upstreams)


class Gateway:
    """What one worker shares across its listeners: upstream pools, checks, the log."""

    def __init__(self, config: ProxyConfig, clock: Clock) -> None:
        self.config = config
        states = {pool.name: PoolState(pool, clock) for pool in config.pools}
        self.upstreams = Upstreams(config.pools, states)
        self.checkers = [HealthChecker(states[pool.name], clock) for pool in config.pools]
        self.access_log = AccessLog(config.access_log)

    def observe(self, ctx: RequestContext, method: str) -> None:
        self.access_log.write(ctx, method)

    async def start(self) -> None:
        self.access_log.start()
        await self.upstreams.start()
        for checker in self.checkers:
            await checker.start()

    async def close(self) -> None:
        for checker in self.checkers:
            await checker.stop()
        await self.upstreams.close()
        await self.access_log.close()

    def app(self, scheme: str) -> web.Application:
        """The application for one listener (its scheme goes into X-Forwarded-Proto)."""
        app = web.Application(
            middlewares=stages(self.config, scheme, self.observe),
            client_max_size=1,  # bodies are streamed by the forwarder, never read whole
            handler_args=None,
        )
        app[UPSTREAMS] = self.upstreams
        forwarder = Forwarder(self.config, self.upstreams)
        app.router.add_route("*", "/{tail:.*}", forwarder.handle)
        return app
