"""One worker's aiohttp application: the pipeline in front of the forwarder."""

from __future__ import annotations

from stockade.clock import Clock
from stockade.proxy.access_log import AccessLog
from stockade.proxy.auth_setup import build_authenticator
from stockade.proxy.context import RequestContext
from stockade.proxy.forward import Forwarder, Upstreams
from stockade.proxy.health import HealthChecker
from stockade.proxy.limits import GuardedServer, LimitCounters, handler_kwargs
from stockade.proxy.pipeline import pipeline
from stockade.proxy.settings import ProxyConfig
from stockade.proxy.upstream import PoolState


class Gateway:
    """What one worker shares across its listeners: upstream pools, checks, the log."""

    def __init__(self, config: ProxyConfig, clock: Clock) -> None:
        self.config = config
        states = {pool.name: PoolState(pool, clock) for pool in config.pools}
        self.upstreams = Upstreams(config.pools, states)
        self.checkers = [HealthChecker(states[pool.name], clock) for pool in config.pools]
        self.access_log = AccessLog(config.access_log)
        self.forwarder = Forwarder(config, self.upstreams)
        self.auth = build_authenticator(config.auth, clock)

    def observe(self, ctx: RequestContext, method: str) -> None:
        self.access_log.write(ctx, method)

    async def start(self) -> None:
        if self.auth.verifier is not None:
            await self.auth.verifier.start()
        self.access_log.start()  # upstream connections are made on first use
        for checker in self.checkers:
            await checker.start()

    async def close(self) -> None:
        for checker in self.checkers:
            await checker.stop()
        await self.upstreams.close()
        if self.auth.verifier is not None:
            await self.auth.verifier.close()
        await self.access_log.close()

    def server(self, scheme: str, counters: LimitCounters | None = None) -> GuardedServer:
        """aiohttp's low-level server for one listener: no router, no application.

        Every request runs the same pipeline, so the router and the app's
        handler machinery would only cost time. The scheme goes into
        X-Forwarded-Proto.
        """
        handler = pipeline(
            self.config, scheme, self.observe, self.forwarder.handle, self.auth.stage()
        )
        return GuardedServer(
            handler,
            self.config,
            counters,
            access_log=None,  # our access log, not aiohttp's (it costs per request too)
            **handler_kwargs(self.config),
        )
